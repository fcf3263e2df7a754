"""OFA-KD's loss with adaptive target enhancement (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS 2023, arXiv:2310.19444; code Hao840/OFAKD distillers/ofa.py).
    L(z; eps) = mean_b [ - sum_c ((p_t,c + y_c)^eps - y_c) log p_s,c ]        p = softmax(z / T), y = one-hot
At eps = 1 it is the cross-entropy to the teacher; as in the reference code, it is not multiplied by T^2.
Weights and gradients: docs/distill.md, "effai/train/losses/ofa.py".
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from effai.train.losses.kd import check_logits


def ofa_target_weights(p_t: Tensor, target: Tensor, eps: float) -> Tensor:
    """The per-class weights (p_t + y)^eps - y, shape (B, K)."""
    y = F.one_hot(target, p_t.shape[1]).to(p_t.dtype)
    return (p_t + y).pow(eps) - y


def ofa_loss(z_s: Tensor, z_t: Tensor, target: Tensor, eps: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Scalar OFA loss of student logits `z_s` (B, K) against teacher logits `z_t` (detached) and labels."""
    check_logits(z_s, z_t)
    if eps <= 0 or temperature <= 0:
        raise ValueError(f"eps and temperature must be > 0, got eps={eps}, temperature={temperature}")
    p_t = F.softmax(z_t.detach() / temperature, dim=1)
    w = ofa_target_weights(p_t, target, eps)
    return -(w * F.log_softmax(z_s / temperature, dim=1)).sum(dim=1).mean()
