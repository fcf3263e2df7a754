"""Teachers for data-free distillation: trained effai checkpoints, frozen, with their pre-logits features exposed.

Every teacher must predict the same classes (same labels, same order) from the same input size and channels; the
pre-logits feature is the input of the classifier module (`get_classifier()`, timm's pretrained_cfg "classifier",
or a module named classifier/fc/head), captured by a forward hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effai.errors import UsageError
from effai.train.cdfkd.losses import BNStatistics
from effai.zoo.features import FeatureCapture, resolve_module
from effai.zoo.card import ModelCard


@dataclass
class Teacher:
    spec: str
    model: nn.Module
    card: ModelCard
    classifier: str                   # module path whose input is the pre-logits feature
    dim: int                          # width of that feature
    labels: list[str]
    record: dict[str, Any] = field(default_factory=dict)   # the teacher's own effai.train record, if any

    @property
    def split(self) -> dict[str, Any] | None:
        """The held-out split the teacher was trained with ({data, seed, val_fraction}), as the zoo resolved it."""
        return self.card.extra.get("split")

    @property
    def seed(self) -> int | None:
        return self.split["seed"] if self.split else None

    def summary(self) -> dict[str, Any]:
        return {"spec": self.spec, "model": self.card.source, "feature_dim": self.dim,
                "batchnorm_layers": sum(isinstance(m, nn.BatchNorm2d) for m in self.model.modules()),
                "recorded_val_acc": self.record.get("val_acc"), "seed": self.seed}


class TeacherEnsemble:
    """The frozen teachers as the loop uses them. Generated images live in teacher 0's normalized input space;
    a teacher with other mean/std gets them re-normalized (x * std_0 + mean_0 - mean_i) / std_i."""

    def __init__(self, teachers: list[Teacher], bn_first_scale: float = 5.0) -> None:
        self.teachers = teachers
        self.bn = [BNStatistics(t.model, bn_first_scale) for t in teachers]
        self.mean, self.std = teachers[0].card.mean, teachers[0].card.std

    def __len__(self) -> int:
        return len(self.teachers)

    def to(self, device: torch.device) -> TeacherEnsemble:
        for t in self.teachers:
            t.model.to(device)
        return self

    def input(self, x: torch.Tensor, t: Teacher) -> torch.Tensor:
        if t.card.mean == self.mean and t.card.std == self.std:
            return x
        def col(v: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(v, device=x.device).view(1, -1, 1, 1)

        return (x * col(self.std) + col(self.mean) - col(t.card.mean)) / col(t.card.std)

    def logits_and_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each teacher's logits (B, K) and pre-logits features (B, d_i)."""
        logits, feats = [], []
        for t in self.teachers:
            with FeatureCapture(t.model, [t.classifier], where="input") as cap:
                logits.append(t.model(self.input(x, t)))
            feats.append(cap.outputs[0].flatten(1))
        return logits, feats

    def logits_and_bn_terms(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Each teacher's logits and its BatchNorm-statistics term (None for a teacher without BatchNorm)."""
        logits, terms = [], []
        for t, bns in zip(self.teachers, self.bn):
            with bns:
                logits.append(t.model(self.input(x, t)))
                terms.append(bns.loss())
        return logits, terms


def load_teachers(specs: tuple[str, ...]) -> list[Teacher]:
    teachers = [load_teacher(s) for s in specs]
    first = teachers[0]
    for t in teachers[1:]:
        if t.card.num_classes != first.card.num_classes:
            raise UsageError(f"teachers disagree on the classes: {first.spec} predicts {first.card.num_classes}, "
                             f"{t.spec} {t.card.num_classes}; use teachers trained on the same classes")
        if t.labels != first.labels:
            raise UsageError(f"teachers disagree on the labels: {first.spec} has {first.labels[:5]}..., {t.spec} "
                             f"{t.labels[:5]}...; use teachers trained on the same classes in the same order")
        if tuple(t.card.input_size) != tuple(first.card.input_size):
            raise UsageError(f"teachers disagree on the input: {first.spec} takes {list(first.card.input_size)}, "
                             f"{t.spec} {list(t.card.input_size)}; train them at one --input-size and channel count")
    return teachers


def load_teacher(spec: str) -> Teacher:
    from effai import zoo

    path = Path(spec)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"teacher '{spec}' is not an effai training run or .safetensors checkpoint; data-free "
                         "distillation needs trained teachers (effai train supervised --out DIR, then pass DIR)")
    try:
        loaded = zoo.create(weights=path)
    except UsageError as e:
        raise UsageError(f"teacher {spec} cannot load: {e}") from e
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    classifier = classifier_path(model)
    c, h, w = loaded.card.input_size
    with torch.no_grad(), FeatureCapture(model, [classifier], where="input") as cap:
        model(torch.zeros(2, c, h, w))
    dim = int(cap.outputs[0].flatten(1).shape[1])
    return Teacher(spec=spec, model=model, card=loaded.card, classifier=classifier, dim=dim,
                   labels=list(zoo.labels(loaded.card)), record=dict(loaded.card.extra.get("train_record", {})))


def classifier_path(model: nn.Module) -> str:
    """Module path of the classifier (the last Linear producing logits)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in model.named_modules():
            if m is head and name:
                return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    key = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(key, str):
        resolve_module(model, key)
        return key
    for name in ("classifier", "fc", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise UsageError(f"cannot find the classifier of teacher {type(model).__name__} (no get_classifier(), no "
                     "classifier/fc/head module); its pre-logits features are needed for the feature loss")
