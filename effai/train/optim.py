"""What every training loop shares: parameter groups (weight decay on weights only) and the learning-rate schedule.

No decay on biases and normalization parameters (ndim <= 1) nor on a token model's position embedding and class /
register tokens (DeiT's and timm's convention: decaying them toward 0 erases position and class information).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """[{decayed params, weight_decay}, {the rest, 0}] over the trainable parameters of `modules`."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(base_lr: float, step: int, total: int, warmup: int = 0) -> float:
    """The learning rate at `step` of `total`: linear warmup to `base_lr` over `warmup` steps, then cosine decay to 0
    (Loshchilov & Hutter, SGDR, arXiv:1608.03983, without restarts; Goyal et al. arXiv:1706.02677 for the warmup)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
