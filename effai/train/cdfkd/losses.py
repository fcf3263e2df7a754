"""CDFKD-MFS losses (Hao et al., IEEE TMM 2022, arXiv:2205.11845); s_i / t_i the logits of header i / teacher i:
    L_S = mean_i L1(s_i, t_i) + 0.2 mean_i mean_b sum_d |f_s,i - f_t,i| + 5 L1(mean_i s_i, mean_i t_i)
    L_G = sum_i [ -L1(s_i, t_i) / N + 0.1 sum_l r_l (||mu(x_l) - mu_run,l||_2 + ||var(x_l) - var_run,l||_2) / N ]
f: pre-logits features; x_l: the input of teacher i's BatchNorm2d l (r_l = 5 for the first BN, else 1).
Reductions and references: docs/distill.md, "effai/train/cdfkd/losses.py".
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def student_loss(s_logits: Sequence[Tensor], t_logits: Sequence[Tensor], s_feats: Sequence[Tensor],
                 t_feats: Sequence[Tensor], *, feat_weight: float = 0.2, ens_weight: float = 5.0
                 ) -> tuple[Tensor, dict[str, float]]:
    """L_S and its three terms (already weighted) for logging. Teacher tensors should be detached."""
    l_s = torch.stack([F.l1_loss(s, t) for s, t in zip(s_logits, t_logits)]).mean()
    l_feat = feat_weight * torch.stack([(fs - ft).abs().sum(1).mean() for fs, ft in zip(s_feats, t_feats)]).mean()
    l_ens = ens_weight * F.l1_loss(torch.stack(list(s_logits)).mean(0), torch.stack(list(t_logits)).mean(0))
    total = l_s + l_feat + l_ens
    return total, {"loss_s": l_s.item(), "loss_feat": l_feat.item(), "loss_ens": l_ens.item()}


def generator_loss(s_logits: Sequence[Tensor], t_logits: Sequence[Tensor], bn_terms: Sequence[Tensor | None], *,
                   adv_weight: float = 1.0, bn_weight: float = 0.1) -> tuple[Tensor, dict[str, float]]:
    """L_G; bn_terms[i] = sum_l r_l (...) of teacher i, None for a teacher without BatchNorm (no BN term)."""
    n = len(t_logits)
    adv = -adv_weight * sum(F.l1_loss(s, t) for s, t in zip(s_logits, t_logits)) / n
    present = [b for b in bn_terms if b is not None]
    bn = bn_weight * sum(present) / n if present else torch.zeros((), device=adv.device)
    return adv + bn, {"loss_g_adv": float(adv.detach()), "loss_g_bn": float(bn.detach())}


def bn_statistic_distance(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """||mu(x) - mu_run||_2 + ||var(x) - var_run||_2 over channels of a BN input x (N, C, H, W)."""
    mean = x.mean(dim=(0, 2, 3))
    var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
    return torch.norm(bn.running_mean - mean, 2) + torch.norm(bn.running_var - var, 2)


class BNStatistics:
    """Forward hooks on the input of every BatchNorm2d (with running statistics) of a model.

        with BNStatistics(teacher) as bns:
            teacher(x)
            term = bns.loss()        # sum_l r_l * bn_statistic_distance(x_l, bn_l), r = first_scale for the first BN
    """

    def __init__(self, model: nn.Module, first_scale: float = 5.0) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        self.first_scale = first_scale
        self._dist: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def __len__(self) -> int:
        return len(self.layers)

    def __enter__(self) -> BNStatistics:
        self._dist.clear()
        for i, m in enumerate(self.layers):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._dist[i] = bn_statistic_distance(args[0], module)   # type: ignore[arg-type]
        return hook

    def loss(self) -> Tensor | None:
        """The weighted sum over the BNs that ran in the last forward; None for a model without BatchNorm."""
        if not self.layers:
            return None
        if not self._dist:
            raise RuntimeError("no BatchNorm layer ran since the hooks were installed; call loss() after a forward")
        return sum((self.first_scale if i == 0 else 1.0) * d for i, d in sorted(self._dist.items()))
