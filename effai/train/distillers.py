"""Distillers: the student, the frozen teacher and any training-only modules, with the recipe's loss in forward.

`logits, losses = distiller(x, x_t, y)` (x_t: the same images normalized for the teacher). `Vanilla`: CE_smooth +
kd_weight * L_kd (LOSSES: kd, dkd, dist); `OFA`: CE_smooth + w * L_OFA on the final logits and projected stage exits.
Only `distiller.student` is kept, averaged (EMA) and exported. Formulas: docs/distill.md, "effai/train/distillers.py".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effai.errors import UsageError
from effai.registry import Registry
from effai.zoo.features import FeatureCapture, feature_info, stage_exits
from effai.train.losses import LOSSES, KDParams
from effai.train.losses.ofa import ofa_loss
from effai.train.projectors import PROJECTORS, family_of, init_projector


class Distiller(nn.Module):
    """Base: holds `student` and an optional frozen `teacher` (always in eval mode)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Any) -> None:
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch the next steps belong to (for epoch-dependent loss weights such as DKD's warm-up)."""
        self.epoch = int(epoch)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def aux(self) -> nn.Module | None:
        """Training-only modules (trained with the student, dropped at export); None when there are none."""
        return None

    def teacher_logits(self, x_t: Tensor | None) -> Tensor | None:
        if self.teacher is None or x_t is None:
            return None
        with torch.no_grad():
            return self.teacher(x_t).float()

    def forward(self, x: Tensor, x_t: Tensor | None, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


def kd_params(cfg: Any) -> KDParams:
    """The logit losses' hyper-parameters from a TrainConfig (KDParams' defaults for fields it lacks)."""
    d = KDParams()
    return KDParams(temperature=getattr(cfg, "kd_temperature", d.temperature),
                    dkd_alpha=getattr(cfg, "dkd_alpha", d.dkd_alpha), dkd_beta=getattr(cfg, "dkd_beta", d.dkd_beta),
                    dist_beta=getattr(cfg, "dist_beta", d.dist_beta),
                    dist_gamma=getattr(cfg, "dist_gamma", d.dist_gamma))


def warmup_factor(epoch: int | None, warmup: int) -> float:
    """min((epoch + 1) / warmup, 1): mdistiller's DKD warm-up min(epoch / 20, 1) with its 1-based epoch."""
    if warmup <= 0:
        return 1.0
    if epoch is None:
        raise RuntimeError("dkd_warmup needs the epoch: the training loop must call distiller.set_epoch(epoch) "
                           "at the start of every epoch")
    return min((epoch + 1) / warmup, 1.0)


class Vanilla(Distiller):
    """CE with label smoothing, plus kd_weight * the registered distillation loss when a teacher is given."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Any) -> None:
        super().__init__(student, teacher, cfg)
        self.params = kd_params(cfg)

    def forward(self, x: Tensor, x_t: Tensor | None, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        losses = {"ce": F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)}
        z_t = self.teacher_logits(x_t)
        if z_t is not None:
            w = self.cfg.kd_weight
            if self.cfg.loss == "dkd" and self.training:
                w *= warmup_factor(self.epoch, getattr(self.cfg, "dkd_warmup", 0))
            losses["kd"] = w * LOSSES.get(self.cfg.loss)(logits.float(), z_t, y, self.params)
        return logits, losses


def final_width(model: nn.Module, example: Tensor) -> int:
    """The width of a model's final feature (timm's num_features, else its last stage's channels)."""
    n = getattr(model, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    info = feature_info(model)
    if info:
        return int(info[-1]["num_chs"])
    raise UsageError(f"{type(model).__name__} declares neither num_features nor feature_info; OFA-KD needs the "
                     "final feature width of student and teacher")


class OFA(Distiller):
    """OFA-KD (Hao et al., NeurIPS 2023, arXiv:2310.19444): exits after the student's stages, each projected into
    the teacher's logit space and trained with the adaptive-target OFA loss, as are the final logits."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Any, example: Tensor,
                 example_t: Tensor | None = None) -> None:
        super().__init__(student, teacher, cfg)
        if teacher is None:
            raise UsageError("recipe 'ofa' distils from a teacher; pass --teacher (an effai run dir or .safetensors)")
        self.exits = list(cfg.exits) if cfg.exits else stage_exits(student)
        n = len(self.exits)
        if not 1 <= n <= 4:
            raise UsageError(f"OFA-KD takes 1 to 4 exits (the student's stages), got {n}: {self.exits}")
        eps = tuple(cfg.ofa_eps)
        if len(eps) == 1:
            eps = eps * (n + 1)
        if len(eps) != n + 1:
            raise UsageError(f"--set ofa_eps needs 1 value or {n + 1} (one per exit, then the final logits), got {len(eps)}")
        if min(eps) <= 0 or cfg.ofa_temperature <= 0:
            raise UsageError(f"ofa_eps {eps} and ofa_temperature {cfg.ofa_temperature} must be > 0 (the paper: eps 1 "
                             "to 1.5, temperature 1)")
        self.eps = eps
        was = student.training
        student.eval()
        with torch.no_grad(), FeatureCapture(student, self.exits) as cap:
            z = student(example[:1])
        student.train(was)
        d_s = final_width(student, example)
        d_t = final_width(teacher, example_t if example_t is not None else example)
        self.family = family_of(student, cap.outputs[-1], self.exits[-1])
        rule = PROJECTORS.get(self.family)
        stages = range(5 - n, 5)                          # the last exit is stage 4
        self.projectors = nn.ModuleList(rule.build(student, f, s, d_s, d_t, z.shape[1])
                                        for f, s in zip(cap.outputs, stages))
        init_projector(self.projectors)

    def aux(self) -> nn.Module:
        return self.projectors

    def forward(self, x: Tensor, x_t: Tensor | None, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with FeatureCapture(self.student, self.exits) as cap:
            logits = self.student(x)
        z_t = self.teacher_logits(x_t)
        assert z_t is not None
        t, w = self.cfg.ofa_temperature, self.cfg.ofa_weight
        losses = {"ce": F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing),
                  "ofa": w * ofa_loss(logits.float(), z_t, y, self.eps[-1], t)}
        for i, (proj, f) in enumerate(zip(self.projectors, cap.outputs)):
            losses[f"ofa_exit{i + 1}"] = w * ofa_loss(proj(f).float(), z_t, y, self.eps[i], t)
        return logits, losses


DISTILLERS: Registry[type[Distiller]] = Registry("distiller")
DISTILLERS.register("vanilla", Vanilla)
DISTILLERS.register("ofa", OFA)


def build_distiller(cfg: Any, student: nn.Module, teacher: nn.Module | None, example: Tensor,
                    example_t: Tensor | None) -> Distiller:
    kind = "ofa" if cfg.recipe == "ofa" else "vanilla"
    cls = DISTILLERS.get(kind)
    if cls is OFA:
        return OFA(student, teacher, cfg, example, example_t)
    return cls(student, teacher, cfg)
