"""Distillation losses and their registry. Every registered loss is called as `loss(z_s, z_t, target[, params])`:
`LOSSES.get("dkd")(student_logits, teacher_logits.detach(), labels, KDParams(temperature=4.0))`.

`KDParams` holds the methods' hyper-parameters; its defaults are VanillaKD's (Hao840/vanillaKD train-kd.py:
--temperature 1, --dkd-alpha 1, --dkd-beta 2, --dist-beta 1, --dist-gamma 1). The recipes set them from
`TrainConfig` (`--set kd_temperature=4 --set dkd_beta=8 ...`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from effai.registry import Registry
from effai.train.losses.dist import dist_loss
from effai.train.losses.dkd import dkd_loss
from effai.train.losses.kd import kd_loss
from effai.train.losses.ofa import ofa_loss

__all__ = ["LOSSES", "KDParams", "dist_loss", "dkd_loss", "kd_loss", "ofa_loss"]


@dataclass(frozen=True)
class KDParams:
    """Hyper-parameters of the logit losses; defaults = VanillaKD's command-line defaults."""

    temperature: float = 1.0    # T of kd and dkd, tau of dist (VanillaKD's one --temperature for all three)
    dkd_alpha: float = 1.0      # weight of TCKD
    dkd_beta: float = 2.0       # weight of NCKD
    dist_beta: float = 1.0      # weight of DIST's inter-class (per-sample) relation
    dist_gamma: float = 1.0     # weight of DIST's intra-class (per-class) relation


DEFAULT = KDParams()

LOSSES: Registry[Callable[..., Tensor]] = Registry("distillation loss")


def _kd(z_s: Tensor, z_t: Tensor, target: Tensor, p: KDParams = DEFAULT) -> Tensor:
    """Vanilla KD at T = p.temperature."""
    return kd_loss(z_s, z_t, temperature=p.temperature)


def _dkd(z_s: Tensor, z_t: Tensor, target: Tensor, p: KDParams = DEFAULT) -> Tensor:
    """DKD with alpha, beta, T from p."""
    return dkd_loss(z_s, z_t, target, alpha=p.dkd_alpha, beta=p.dkd_beta, temperature=p.temperature)


def _dist(z_s: Tensor, z_t: Tensor, target: Tensor, p: KDParams = DEFAULT) -> Tensor:
    """DIST with beta, gamma, tau from p."""
    return dist_loss(z_s, z_t, beta=p.dist_beta, gamma=p.dist_gamma, tau=p.temperature)


LOSSES.register("kd", _kd)
LOSSES.register("dkd", _dkd)
LOSSES.register("dist", _dist)
