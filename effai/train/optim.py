"""Parameter groups shared by every training loop: weight decay on weights only.

No decay on biases and normalization parameters (ndim <= 1) nor on a token model's position embedding and class /
register tokens (DeiT's and timm's convention: decaying them toward 0 erases position and class information).
"""

from __future__ import annotations

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
