"""Small token models for small images: ViT (Dosovitskiy et al. 2021, arXiv:2010.11929) and MLP-Mixer (Tolstikhin
et al. 2021, arXiv:2105.01601) at the sizes CPU training on small data affords, built from timm's own classes (so
timm's feature_info, weight names and export behaviour hold).

    vit_pico    dim  96, depth  6, 3 heads, patch 8   (~0.7M params at 64x64)
    vit_tiny    dim 192, depth 12, 3 heads, patch 8   (ViT-Ti / DeiT-Ti's shape, DeViT's device model)
    vit_small   dim 384, depth 12, 6 heads, patch 8   (ViT-S's shape)
    mixer_pico  dim  96, depth  6, patch 8            (~0.5M params at 64x64)

`img_size` is the training resolution (the card's input size); the position embedding is fixed to its patch grid.
"""

from __future__ import annotations

from typing import Any

from torch import nn

VIT_SHAPES = {"vit_pico": (96, 6, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}
MIXER_SHAPES = {"mixer_pico": (96, 6)}


def vit(name: str, *, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, num_classes: int = 10,
        **kw: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = VIT_SHAPES[name]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=dim, depth=depth, num_heads=heads, **kw)


def mixer(name: str, *, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, num_classes: int = 10,
          **kw: Any) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    dim, depth = MIXER_SHAPES[name]
    return MlpMixer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    embed_dim=dim, num_blocks=depth, **kw)
