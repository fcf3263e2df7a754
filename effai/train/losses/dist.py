"""DIST: distillation from a stronger teacher by matching correlations (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from effai.train.losses.kd import check_logits

EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of matching rows, as the reference computes it. Shape (B,).

    r = <a', b'> / (|a'| |b'| + eps) with a', b' the row-centred inputs (hunto/DIST_KD and Hao840/vanillaKD
    `pearson_correlation`). |r| <= 1 (Cauchy-Schwarz); a row without variance gives r = 0, not 1, and r falls
    short of the plain Pearson by the factor |a'||b'| / (|a'||b'| + eps), which matters where the softmax is
    nearly flat (large tau, many classes): at K = 1000, tau = 8 the centred norms are ~1e-4.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


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
    Defaults beta=gamma=tau=1 (VanillaKD baselines; `--set dist_beta/dist_gamma/kd_temperature`). Invariant to
    adding a per-row constant to either logits (the softmax is). L ~ 0 when softmax(z_s/tau) == softmax(z_t/tau)
    (up to the reference's eps). With B=1 each class column is one value without variance, so every column's
    Pearson is 0 and intra = 1, as in the reference.
    """
    inter, intra = dist_parts(z_s, z_t, tau)
    return tau * tau * (beta * inter + gamma * intra)
