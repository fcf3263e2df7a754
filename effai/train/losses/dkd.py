"""Decoupled knowledge distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from effai.train.losses.kd import check_logits, kl_rows


def _split(z: Tensor, target: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """log [p_gt, 1 - p_gt] (B, 2) and log-softmax over the K-1 non-target classes (B, K-1), at temperature t."""
    b, k = z.shape
    gt = F.one_hot(target, k).bool()
    log_p = F.log_softmax(z / t, dim=1)
    log_other = log_p[~gt].view(b, k - 1)            # boolean indexing keeps row-major order
    log_rest = torch.logsumexp(log_other, dim=1)     # log(1 - p_gt), without computing 1 - p_gt
    binary = torch.stack([log_p[gt], log_rest], dim=1)
    return binary, F.log_softmax((z / t)[~gt].view(b, k - 1), dim=1)


def dkd_parts(z_s: Tensor, z_t: Tensor, target: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD), each (B,), both scaled by T^2.

    TCKD = T^2 KL(b_t || b_s), b = [p_gt, 1 - p_gt]; NCKD = T^2 KL(q_t || q_s), q = softmax over the non-target
    classes. The target class is dropped exactly (the reference masks its logit with -1000 before the softmax,
    which is the same whenever |z/T| << 1000). Identity (DKD paper, eq. 1-4), at one T:
        KD per sample = TCKD + (1 - p_t,gt^T) * NCKD.
    """
    check_logits(z_s, z_t)
    if target.shape != z_s.shape[:1] or target.dtype.is_floating_point:
        raise ValueError(f"expected integer class targets of shape ({z_s.shape[0]},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t, target = temperature, target.long()
    bin_s, nc_s = _split(z_s, target, t)
    bin_t, nc_t = _split(z_t, target, t)
    return t * t * kl_rows(bin_s, bin_t), t * t * kl_rows(nc_s, nc_t)


def dkd_loss(z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 2.0,
             temperature: float = 1.0) -> Tensor:
    """DKD: L = mean_b (alpha * TCKD + beta * NCKD). Scalar. See `dkd_parts` for the two terms.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
    Defaults alpha=1, beta=2, T=1 as in the VanillaKD baselines (Hao et al., NeurIPS 2023; `--set dkd_alpha/
    dkd_beta/kd_temperature`). mdistiller's warm-up (the term times min(epoch / W, 1)) is the recipe's `dkd_warmup`,
    applied by the distiller. With K=2 there is one non-target class, so NCKD = 0.
    """
    tckd, nckd = dkd_parts(z_s, z_t, target, temperature)
    return (alpha * tckd + beta * nckd).mean()
