"""SrConfig: every knob of an `effai train sr` run (SRDiff baseline or SAM-DiffSR), scaled for minutes on a CPU."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from effai.errors import UsageError

METHODS = ("srdiff", "sam-diffsr")


@dataclass(frozen=True)
class SrConfig:
    method: str = "srdiff"         # srdiff (baseline) | sam-diffsr (SPE-modulated training noise)
    data: str = "photos"           # 'photos' (scikit-image's training photos) or a folder of images
    out: str = "runs/sr"
    masks: str = "slic"            # sam-diffsr: slic | felzenszwalb | a folder of <image>.png/.npz masks
    spe: str = "rope"              # structural position encoding: rope (the reference's) | sincos
    spe_strength: float = 1.0      # multiplies c_t * E (1: the paper's modulation; 0: SRDiff exactly)
    spe_normalize: bool = False    # rescale each image's E to max|E| = 1 (the reference's default: off)
    scale: int = 2                 # 2 or 4 (bicubic downsampling)
    input_size: int = 16           # LR tile side; the HR tile is input_size * scale
    enc_channels: int = 16
    enc_blocks: int = 2
    growth: int = 8
    unet_channels: int = 16
    timesteps: int = 100
    schedule: str = "cosine"       # cosine | linear
    iterations: int = 1500
    batch_size: int = 8
    lr: float = 1e-3               # Adam, cosine decay to 0
    seed: int = 0                  # init, crops and noise; the same seed gives the same crops for both methods
    eval_every: int = 250          # held-out loss and checkpoint every N iterations
    threads: int = 0               # torch CPU threads (0: torch's default); 1 is fastest on a busy shared host
    resume: bool = False

    def __post_init__(self) -> None:
        if self.data == "digits":   # `effai train`'s default --data: super-resolution trains on photos
            object.__setattr__(self, "data", "photos")
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}'; choose from: {', '.join(METHODS)}")
        if self.iterations < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise UsageError("--iterations, --batch-size, --lr and eval_every must be positive")
        if self.spe_strength < 0:
            raise UsageError(f"spe_strength {self.spe_strength} must be >= 0")
        from effai.zoo.srdiff import SPE_KINDS

        if self.spe not in SPE_KINDS:
            raise UsageError(f"unknown SPE encoding '{self.spe}'; choose from: {', '.join(SPE_KINDS)}")
        if self.method == "srdiff" and self.masks not in ("slic", "none"):
            raise UsageError(f"masks={self.masks} only applies to method=sam-diffsr; add --set method=sam-diffsr")
        if self.method == "sam-diffsr" and self.masks == "none":
            raise UsageError("method=sam-diffsr needs masks: slic, felzenszwalb or a folder of .png/.npz masks")
        self.spec()   # scale, sizes and schedule checked here

    def spec(self) -> Any:
        from effai.zoo.srdiff import SRDiffSpec

        return SRDiffSpec(scale=self.scale, lr_size=self.input_size, enc_channels=self.enc_channels,
                          enc_blocks=self.enc_blocks, growth=self.growth, unet_channels=self.unet_channels,
                          timesteps=self.timesteps, schedule=self.schedule)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
