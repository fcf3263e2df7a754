"""Distillation losses and their registry. Every registered loss is called as `loss(z_s, z_t, target) -> Tensor`.

    from effai.train.losses import LOSSES
    loss = LOSSES.get("dkd")(student_logits, teacher_logits.detach(), labels)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from effai.registry import Registry
from effai.train.losses.dist import dist_loss
from effai.train.losses.dkd import dkd_loss
from effai.train.losses.kd import kd_loss
from effai.train.losses.ofa import ofa_loss

__all__ = ["LOSSES", "dist_loss", "dkd_loss", "kd_loss", "ofa_loss"]

LOSSES: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("distillation loss")


def _kd(z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
    """Vanilla KD, T=1."""
    return kd_loss(z_s, z_t, temperature=1.0)


def _dkd(z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
    """DKD, alpha=1, beta=2, T=1."""
    return dkd_loss(z_s, z_t, target, alpha=1.0, beta=2.0, temperature=1.0)


def _dist(z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
    """DIST, beta=gamma=tau=1."""
    return dist_loss(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0)


LOSSES.register("kd", _kd)
LOSSES.register("dkd", _dkd)
LOSSES.register("dist", _dist)
