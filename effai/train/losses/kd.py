"""Vanilla knowledge distillation (Hinton et al.), as used by VanillaKD (Hao et al.)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def check_logits(z_s: Tensor, z_t: Tensor) -> None:
    """Student and teacher logits must both be (B, K) with B >= 1 and K >= 2."""
    if z_s.dim() != 2 or z_s.shape != z_t.shape or z_s.shape[0] < 1 or z_s.shape[1] < 2:
        raise ValueError(f"expected student and teacher logits of one shape (B, K), B >= 1, K >= 2; "
                         f"got {tuple(z_s.shape)} and {tuple(z_t.shape)}")


def kl_rows(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    """KL(p_t || p_s) per row, from log-probabilities: sum_c p_t,c (log p_t,c - log p_s,c). Shape (B,)."""
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)


def kd_per_sample(z_s: Tensor, z_t: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(p_t^T || p_s^T) for each sample, p^T = softmax(z / T). Shape (B,)."""
    check_logits(z_s, z_t)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = temperature
    return t * t * kl_rows(F.log_softmax(z_s / t, dim=1), F.log_softmax(z_t / t, dim=1))


def kd_loss(z_s: Tensor, z_t: Tensor, temperature: float = 1.0) -> Tensor:
    """Vanilla KD: L = T^2 * mean_b KL(p_t^T || p_s^T), p^T = softmax(z / T). Scalar.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NeurIPS 2014 DL Workshop,
    arXiv:1503.02531; defaults (T=1, weight 1 next to the task loss) from Hao et al., "VanillaKD: Revisit the
    Power of Vanilla Knowledge Distillation from Small Scale to Large Scale", NeurIPS 2023, arXiv:2305.15781
    (`--set kd_temperature=T --set kd_weight=W`).

    L = 0 iff z_s - z_t is constant along each row. Gradient: dL/dz_s = T * (p_s^T - p_t^T) / B
    (T^2 from the loss times 1/T from the softmax). Pass a detached teacher to keep gradients off it.
    """
    return kd_per_sample(z_s, z_t, temperature).mean()
