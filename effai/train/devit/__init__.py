"""DeViT (Xu et al., IEEE TMC 2023, arXiv:2309.05015): decompose a ViT into N small ViTs, one per edge device, each
trained on a class subset by decomposition-and-ensemble distillation, fused by a small head on a coordinator.
Runtime (one process per device, torch.distributed over TCP): effai.devit_runtime."""

from effai.train.devit.config import DevitConfig
from effai.train.devit.loop import train_devit

__all__ = ["DevitConfig", "train_devit"]
