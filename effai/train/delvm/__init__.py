"""DeLVM training (Guo et al. 2024, arXiv:2402.04841): a VQ tokenizer, then a tiny Llama LM on visual sentences
(tail augment | repeat | none; optional logit KD from a larger LM). `train_delvm(DelvmConfig(out="runs/delvm"))`.
Spec: docs/delvm.md."""

from effai.train.delvm.config import DelvmConfig
from effai.train.delvm.loop import train_delvm

__all__ = ["DelvmConfig", "train_delvm"]
