"""CDFKD-MFS: collaborative data-free knowledge distillation with multi-level feature sharing.

Several trained teachers, no training data: a generator draws images on which a multi-header student (one shared
backbone, one header per teacher) imitates every teacher, while the generator seeks images where they disagree.

    from effai.train.cdfkd import CdfkdConfig, train_cdfkd
    result = train_cdfkd(CdfkdConfig(teachers=("runs/t1", "runs/t2", "runs/t3"), out="runs/cdfkd"))

Hao et al., "CDFKD-MFS: Collaborative Data-free Knowledge Distillation via Multi-level Feature Sharing",
IEEE TMM 2022, arXiv:2205.11845. Spec: docs/distill.md (CDFKD-MFS).
"""

from effai.train.cdfkd.config import CdfkdConfig
from effai.train.cdfkd.loop import train_cdfkd

__all__ = ["CdfkdConfig", "train_cdfkd"]
