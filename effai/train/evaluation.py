"""Held-out top-1 of a model on an in-memory dataset (every training loop reports it per epoch)."""

from __future__ import annotations

import torch
from torch import nn

from effai.data import datasets as data_mod


@torch.no_grad()
def evaluate(model: nn.Module, val: data_mod.ImageData, mean: torch.Tensor, std: torch.Tensor,
             device: torch.device, batch: int = 256) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(val), batch):
        x = (val.x[i:i + batch].float() / 255 - mean) / std
        correct += int((model(x.to(device)).argmax(1).cpu() == val.y[i:i + batch]).sum())
    model.train(was)
    return correct / max(1, len(val))
