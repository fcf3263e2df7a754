"""ADEM-VL training (Hao et al. 2024, arXiv:2410.17779): a tiny HF LM trained on templated text, then the projector
and fusion of a frozen LM + frozen vision encoder on real-image VQA. `train_ademvl(AdemvlConfig(out="runs/ademvl"))`.
Spec: docs/ademvl.md.
"""

from effai.train.ademvl.config import AdemvlConfig
from effai.train.ademvl.loop import train_ademvl

__all__ = ["AdemvlConfig", "train_ademvl"]
