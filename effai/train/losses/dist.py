"""DIST: distillation from a stronger teacher by matching correlations (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from effai.train.losses.kd import check_logits

EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of matching rows, guarded against zero variance. Shape (B,).

    r = (<a', b'> + eps) / sqrt((|a'|^2 + eps)(|b'|^2 + eps)) with a', b' the row-centred inputs: the cosine of
    [a', sqrt(eps)] and [b', sqrt(eps)], so r is in [-1, 1] exactly, r = 1 iff a' = b' (also for two constant
    rows), and r differs from the plain Pearson by O(eps / variance).
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    num = (a * b).sum(dim=1) + eps
    return num / torch.sqrt((a.square().sum(dim=1) + eps) * (b.square().sum(dim=1) + eps))


def dist_parts(z_s: Tensor, z_t: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """(inter, intra), each a scalar in [0, 2], without the tau^2 factor.

    y = softmax(z / tau); inter = 1 - mean over samples of Pearson(y_s[b], y_t[b]);
    intra = 1 - mean over classes of Pearson(y_s[:, c], y_t[:, c]).
    """
    check_logits(z_s, z_t)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    y_s, y_t = F.softmax(z_s / tau, dim=1), F.softmax(z_t / tau, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.T, y_t.T).mean()
    return inter, intra


def dist_loss(z_s: Tensor, z_t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """DIST: L = tau^2 * (beta * inter + gamma * intra). Scalar. See `dist_parts` for the two terms.

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022, arXiv:2205.10536.
    Defaults beta=gamma=tau=1 (VanillaKD baselines). Invariant to adding a per-row constant to either logits
    (the softmax is). L = 0 iff softmax(z_s/tau) == softmax(z_t/tau). With B=1 each class column is one value,
    so intra = 0 (no batch to correlate over).
    """
    inter, intra = dist_parts(z_s, z_t, tau)
    return tau * tau * (beta * inter + gamma * intra)
