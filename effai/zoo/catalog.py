"""The zoo's registry of model cards, seeded with GhostNetV3 and compact peers (timm architectures).

Weights: none are bundled for these; `--pretrained` fetches timm's hub weights (needs network) and `--weights PATH`
loads a local checkpoint. Without either, the model is random-init and every output says so.
"""

from __future__ import annotations

from effai.registry import Registry
from effai.zoo.card import ModelCard

CARDS: Registry[ModelCard] = Registry("model")

_APACHE = "Apache-2.0 (timm weights; check the original training data terms)"


def _timm_card(name: str, family: str, description: str, *, reparam: bool = False, size: int = 224,
               crop_pct: float = 0.875, interpolation: str = "bilinear", license: str = _APACHE,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> ModelCard:
    kw = {}
    if mean is not None:
        kw["mean"], kw["std"] = mean, std
    card = ModelCard(name=name, family=family, source=f"timm:{name}", input_size=(3, size, size), crop_pct=crop_pct,
                     interpolation=interpolation, weights_license=license, reparameterizable=reparam,
                     description=description, **kw)
    CARDS.register(name, card)
    return card


for _w in ("050", "100", "130", "160"):
    # effai's own implementation (effai/zoo/ghostnetv3.py); parameter names equal timm's, so timm's checkpoints
    # (and --pretrained, fetched through timm) load directly.
    CARDS.register(f"ghostnetv3_{_w}", ModelCard(
        name=f"ghostnetv3_{_w}", family="ghostnetv3", source=f"effai:ghostnetv3_{_w}", interpolation="bicubic",
        weights_license=_APACHE, reparameterizable=True, extra={"timm_name": f"ghostnetv3_{_w}"},
        description=f"GhostNetV3 {int(_w) / 100:.1f}x (effai's implementation): ghost modules with re-parameterizable "
                    "branches and DFC attention (Liu et al. 2024, arXiv:2404.11202)"))
_timm_card("mobilenetv2_100", "mobilenetv2", "MobileNetV2 1.0x: inverted residuals, linear bottlenecks (Sandler 2018)",
           interpolation="bicubic")
_timm_card("mobilenetv3_large_100", "mobilenetv3", "MobileNetV3-Large 1.0x: SE + hard-swish, NAS-designed (Howard 2019)",
           interpolation="bicubic")
_timm_card("mobilenetv3_small_100", "mobilenetv3", "MobileNetV3-Small 1.0x (Howard 2019)", interpolation="bicubic")
_timm_card("efficientnet_b0", "efficientnet", "EfficientNet-B0: MBConv + SE, compound scaling (Tan & Le 2019)",
           interpolation="bicubic")
_timm_card("deit_tiny_patch16_224", "deit", "DeiT-Tiny: 5.7M-param ViT trained data-efficiently (Touvron 2021)",
           crop_pct=0.9, interpolation="bicubic")
_timm_card("mobileone_s0", "mobileone", "MobileOne-S0: over-parameterized re-parameterizable branches, <1 ms on "
           "iPhone 12 (Vasu 2023)", reparam=True, crop_pct=0.875, interpolation="bilinear")
_timm_card("repvgg_a0", "repvgg", "RepVGG-A0: 3x3+1x1+identity branches folded into one 3x3 conv (Ding 2021)",
           reparam=True, crop_pct=0.875, interpolation="bilinear")

# The embedded default: trained by effai's own recipe on scikit-learn's digits (real handwritten digits shipped in
# scikit-learn, BSD-3), weights shipped in the package (deploy form). How it was trained, and its held-out accuracy,
# ride in the weights file's metadata (`effai zoo show ghostnetv3_050.digits`).
CARDS.register("ghostnetv3_050.digits", ModelCard(
    name="ghostnetv3_050.digits", family="ghostnetv3", source="effai:ghostnetv3_050", input_size=(1, 64, 64),
    mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=1.0, num_classes=10, label_set="digits",
    weights_license="Apache-2.0 (trained by effai on scikit-learn digits, BSD-3-Clause data)",
    reparameterizable=True, bundled_weights="ghostnetv3_050_digits.safetensors",
    extra={"arch_kwargs": {"deploy": True}},
    description="GhostNetV3 0.5x trained by effai (ghostnetv3 recipe, KD from a ResNet-18 teacher) on scikit-learn "
                "digits upsampled to 64x64 greyscale; the README's main job exports it"))

# Small token models (effai/zoo/vit.py) for training on small images: teachers and students of the heterogeneous
# distillation recipes (OFA-KD) and DeViT's device models. No pretrained weights: train them with `effai train`.
for _name, _what in (("vit_pico", "ViT, dim 96, depth 6, 3 heads"), ("vit_tiny", "ViT-Ti shape: dim 192, depth 12, 3 heads"),
                     ("vit_small", "ViT-S shape: dim 384, depth 12, 6 heads"), ("mixer_pico", "MLP-Mixer, dim 96, depth 6")):
    CARDS.register(_name, ModelCard(
        name=_name, family=_name.split("_")[0], source=f"effai:{_name}", input_size=(3, 64, 64), mean=(0.5,) * 3,
        std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0, num_classes=10, label_set=None,
        weights_license="none (no pretrained weights; train with effai train)",
        description=f"{_what}, patch 8, for 64x64 inputs (timm's classes at effai's small sizes)"))

# ADEM-VL (effai/zoo/ademvl.py, docs/ademvl.md): a tiny Llama-class LM trained by effai on templated text + the frozen
# ghostnetv3_050.digits trunk (to blocks.6) + a trained projector and fusion offsets; answers questions about digits
# and scikit-image photos. Weights and the LM/tokenizer folder ship in effai/zoo/weights (effai train ademvl).
CARDS.register("ademvl_tiny.digits", ModelCard(
    name="ademvl_tiny.digits", family="ademvl", source="effai:ademvl", input_size=(1, 64, 64), mean=(0.5,),
    std=(0.5,), interpolation="bilinear", crop_pct=1.0, num_classes=0, label_set=None,
    task="visual-question-answering",
    weights_license="Apache-2.0 (trained by effai on scikit-learn digits, BSD-3, and scikit-image photos)",
    bundled_weights="ademvl_tiny_digits.safetensors",
    extra={"arch_kwargs": {"lm": "bundled:ademvl_tiny_digits_lm", "encoder": "ghostnetv3_050.digits",
                           "feature_layer": "blocks.6", "scales": [4, 2, 1], "mode": "adem", "drop_ratio": 0.1,
                           "beta": 1.0, "scale": 1.0, "proj_hidden": 128}},
    description="ADEM-VL vision-language model (parameter-free cross-attention in a 2-layer Llama LM, Hao et al. "
                "2024): answers 'which digit is this?' and questions about photos; effai generate / effai train ademvl"))

# DeLVM (effai/zoo/vq.py, docs/delvm.md): a VQ-VAE tokenizer (16x16 greyscale -> 16 codes of 64) and a 2-layer Llama LM
# over visual sentences, trained by effai (effai train delvm, the KD student of seed 0); solves invert / edges /
# denoise / threshold in context from one example pair. The tokenizer's file and the LM folder ship in
# effai/zoo/weights; deployment: effai delvm export delvm_tiny.
CARDS.register("delvm_tiny", ModelCard(
    name="delvm_tiny", family="delvm", source="effai:delvm", input_size=(1, 16, 16), mean=(0.5,), std=(0.5,),
    interpolation="bilinear", crop_pct=1.0, num_classes=0, label_set=None, task="image-to-image-in-context",
    weights_license="Apache-2.0 (trained by effai on scikit-learn digits, BSD-3, and scikit-image photos)",
    bundled_weights="delvm_tiny_vq.safetensors",
    extra={"arch_kwargs": {"lm": "bundled:delvm_tiny_lm", "size": 16, "hidden": 32, "dim": 32, "codebook": 64}},
    description="DeLVM in-context image-to-image generation (VQ tokenizer + visual-token Llama LM, Guo et al. 2024, "
                "arXiv:2402.04841): an example pair and a query image -> the query's output; effai delvm export / "
                "effai generate --prompt-images"))

# SRDiff / SAM-DiffSR (effai/zoo/srdiff.py, docs/superres.md): x2 super-resolution of 16x16 LR tiles (32x32 HR),
# trained by effai (effai train sr, SAM-DiffSR with SLIC masks, seed 0) on scikit-image photos; the weights ship in
# effai/zoo/weights. Use: effai sr srdiff_x2 in.png -o out.png (tiled, any size); effai sr export srdiff_x2.
CARDS.register("srdiff_x2", ModelCard(
    name="srdiff_x2", family="srdiff", source="effai:srdiff", input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3,
    interpolation="bicubic", crop_pct=1.0, num_classes=0, label_set=None, task="image-super-resolution",
    weights_license="Apache-2.0 (trained by effai on scikit-image photos)",
    bundled_weights="srdiff_x2_samdiffsr.safetensors",
    extra={"arch_kwargs": {"scale": 2, "enc_channels": 16, "enc_blocks": 2, "growth": 8, "unet_channels": 16,
                           "timesteps": 100, "schedule": "cosine"}},
    description="SAM-DiffSR x2 super-resolution (SRDiff's conditional diffusion UNet + RRDB LR encoder, Li et al. "
                "2022; structural position encoding of SLIC masks in training, Wang et al. 2024): 8-step DDIM; "
                "effai sr / effai sr export"))
