"""CDFKD-MFS: collaborative data-free knowledge distillation with multi-level feature sharing (Hao et al., IEEE TMM
2022, arXiv:2205.11845). Several trained teachers, no training data: a generator draws images on which a
multi-header student (one shared backbone, one header per teacher) imitates every teacher, while the generator seeks
images where they disagree. `train_cdfkd(CdfkdConfig(teachers=("runs/t1", "runs/t2"), out="runs/cdfkd"))`.
Spec: docs/distill.md (CDFKD-MFS).
"""

from effai.train.cdfkd.config import CdfkdConfig
from effai.train.cdfkd.loop import train_cdfkd

__all__ = ["CdfkdConfig", "train_cdfkd"]
