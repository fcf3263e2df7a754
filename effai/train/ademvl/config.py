"""AdemvlConfig: every knob of an ADEM-VL run (`effai train ademvl`): the tiny-LM stage, the vision-language stage.

Hao et al. 2024 (arXiv:2410.17779); sizes scaled to a CPU and the offline VQA set. Defaults: docs/ademvl.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from effai.errors import UsageError
from effai.zoo.ademvl import MODES


@dataclass(frozen=True)
class AdemvlConfig:
    data: str = "digits"                 # 'digits' (offline set: digits + scikit-image photos) or a .jsonl
    out: str = "runs/ademvl"
    image_root: str | None = None        # JSONL images folder (default: the JSONL's folder)
    photos: bool = True                  # add the scikit-image photo questions to the offline set
    lm: str | None = None                # a local HF causal LM folder (Llama / Qwen2); None: train the tiny LM here
    pretrained: bool = False             # hub weights: refused (no network at run time)
    lm_hidden: int = 64                  # the tiny LM (LlamaConfig): width, layers, heads
    lm_layers: int = 2
    lm_heads: int = 4
    lm_steps: int = 400                  # stage 1: causal-LM steps on the templated text of the training split
    lm_lr: float = 3e-3
    encoder: str = "ghostnetv3_050.digits"   # frozen vision encoder: zoo or timm name
    feature_layer: str = "blocks.6"      # the encoder's module whose feature map is pooled
    scales: tuple[int, ...] = (4, 2, 1)  # multiscale pooling grids (tokens: sum of s^2)
    mode: str = "adem"                   # adem | prefix (the LLaVA-style baseline)
    drop_ratio: float = 0.1              # adaptive fusion: share of visual features dropped per text token
    beta: float = 1.0                    # scale of the projected visual features
    scale: float = 1.0                   # s: weight of the fusion branch next to the MLP
    proj_hidden: int = 128
    steps: int = 500                     # stage 2: vision-language steps (projector + fusion only)
    batch_size: int = 32
    lr: float = 3e-3                     # AdamW, warmup then cosine
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int | None = None        # seed of the image split (None: seed)
    val_fraction: float = 0.2
    eval_every: int = 250                # held-out evaluation + atomic checkpoint every this many steps
    resume: bool = False

    def __post_init__(self) -> None:
        if self.pretrained:
            raise UsageError("--set pretrained=true: effai does not download hub weights at run time (no network); "
                             "download the LM where there is network and pass its folder with --set lm=DIR")
        scales = self.scales
        if isinstance(scales, (str, int)):
            scales = tuple(str(scales).replace(",", " ").split())
        try:
            object.__setattr__(self, "scales", tuple(int(s) for s in scales))
        except ValueError:
            raise UsageError(f"scales {self.scales!r} must be integers, e.g. 4,2,1") from None
        if not self.scales or min(self.scales) < 1 or max(self.scales) > 64:
            raise UsageError(f"scales {self.scales} must be grid sides in 1..64, e.g. 4,2,1")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if not 0 <= self.drop_ratio < 1:
            raise UsageError(f"drop_ratio {self.drop_ratio} must lie in [0, 1)")
        positive = {k: getattr(self, k) for k in ("lm_hidden", "lm_layers", "lm_heads", "steps", "batch_size", "lr",
                                                  "lm_lr", "eval_every", "proj_hidden")}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if bad or self.lm_steps < 0:
            raise UsageError(f"ademvl options must be positive: {', '.join(bad) or f'lm_steps={self.lm_steps}'}")
        if self.lm_hidden % self.lm_heads:
            raise UsageError(f"lm_hidden {self.lm_hidden} must be a multiple of lm_heads {self.lm_heads}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"val_fraction {self.val_fraction} must lie in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}
