"""Mixup and CutMix in timm's batch mode (each image mixed with the batch's mirror image), seeded by a Generator.

    mixup:  x = lam x + (1 - lam) x[::-1],  lam ~ Beta(a, a)
    cutmix: a box of area (1 - lam) H W from x[::-1],  lam corrected to the box actually pasted
    targets: lam y_smooth + (1 - lam) y_smooth[::-1]        (Zhang et al. 2018; Yun et al. 2019)
With both on, each batch picks one of the two with probability 1/2 (timm's switch_prob 0.5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def mix_batch(x: Tensor, y: Tensor, num_classes: int, *, mixup: float, cutmix: float, smoothing: float,
              g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(mixed images, soft targets (B, K)); `mixup`/`cutmix` are the Beta parameters (0 turns one off)."""
    off = smoothing / num_classes
    soft = torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)
    rng = np.random.default_rng(int(torch.randint(2 ** 31 - 1, (1,), generator=g)))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    mirror = x.flip(0)
    if use_cutmix:
        lam = float(rng.beta(cutmix, cutmix))
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = mirror[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    elif mixup > 0:
        lam = float(rng.beta(mixup, mixup))
        x = x * lam + mirror * (1 - lam)
    else:
        return x, soft
    return x, soft * lam + soft.flip(0) * (1 - lam)


def soft_cross_entropy(z: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against soft targets (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(z, dim=-1), dim=-1).mean()
