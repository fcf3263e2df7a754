"""`effai train sr`: SRDiff (Li et al. 2022) and SAM-DiffSR (Wang et al. 2024) super-resolution on real photos, with
resumable checkpoints. `train_sr(SrConfig(method="sam-diffsr", out="runs/sr"))`. Spec: docs/superres.md.
"""

from effai.train.sr.config import SrConfig
from effai.train.sr.loop import train_sr

__all__ = ["SrConfig", "train_sr"]
