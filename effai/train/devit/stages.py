"""DeViT's training stages, each a plain loop over one data set (Xu et al., arXiv:2309.05015): `finetune_sub_teacher`
(stage 1), `ranking_batches` (what prune.py ranks on, stage 2), `distil_sub_model` (DEKD, stage 3), `train_ensemble`
(stage 4: L = w MSE(project(concat CLS), teacher CLS) + (1-a) CE(z, y) + a CE(z, argmax z_teacher)).
The stages, optimizer and augmentation: docs/distill.md, "effai/train/devit/stages.py".
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effai.data import datasets as data_mod
from effai.train.devit import dekd
from effai.train.devit.config import DevitConfig
from effai.zoo.devit_fusion import Ensemble
from effai.zoo.features import FeatureCapture
from effai.train.evaluation import evaluate
from effai.train.loop import TrainingDiverged
from effai.train.mixing import mix_batch, soft_cross_entropy
from effai.train.optim import param_groups, warmup_cosine

# step(x normalized, y) -> (loss, logits for train accuracy, terms to log)
Step = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Norm:
    """The teacher's preprocessing, shared by every model of the decomposition."""
    mean: Tensor
    std: Tensor
    device: torch.device

    def __call__(self, raw: Tensor) -> Tensor:
        return ((raw - self.mean) / self.std).to(self.device)


def subset_data(data: data_mod.ImageData, classes: Sequence[int]) -> data_mod.ImageData:
    """The images of `classes`, relabelled 0..len(classes)-1 in the order given."""
    keep = torch.isin(data.y, torch.tensor(list(classes)))
    local = torch.full((len(data.classes),), -1, dtype=torch.long)
    local[torch.tensor(list(classes))] = torch.arange(len(classes))
    return data_mod.ImageData(data.x[keep], local[data.y[keep]], [data.classes[c] for c in classes], data.source)


def fit(stage: str, modules: Sequence[nn.Module], step: Step, train: data_mod.ImageData, val_model: nn.Module,
        val: data_mod.ImageData, *, epochs: int, lr: float, cfg: DevitConfig, norm: Norm, seed: int,
        progress: Any = None, mix_classes: int | None = None) -> list[dict[str, Any]]:
    """Train `modules` with `step` for `epochs`; returns one metrics row per epoch (val accuracy of `val_model`).
    With `mix_classes` (K) and cfg.mixup/cutmix on, each batch is mixed and `step` gets its soft targets."""
    if epochs == 0:
        return []
    batch = min(cfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch
    opt = torch.optim.AdamW(param_groups(modules, cfg.weight_decay), lr=lr)
    total, warmup = epochs * steps_per_epoch, min(cfg.warmup_epochs, epochs - 1) * steps_per_epoch
    hflip = (cfg.data != "digits") if cfg.hflip is None else cfg.hflip

    if progress is not None and hasattr(progress, "console"):
        progress.console.print(f"[bold]{stage}[/]  {len(train)} images, {epochs} epochs")
    rows, i = [], 0
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(len(train), generator=g)
        for m in modules:
            m.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        if progress is not None:
            progress.start_epoch(epoch, epochs, steps_per_epoch)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            raw = data_mod.augment(train.x[idx].float() / 255, g, hflip=hflip, jitter=cfg.jitter)
            y = train.y[idx].to(norm.device)
            target = None
            if mix_classes is not None and (cfg.mixup > 0 or cfg.cutmix > 0):
                raw, target = mix_batch(raw, y, mix_classes, mixup=cfg.mixup, cutmix=cfg.cutmix,
                                        smoothing=cfg.label_smoothing, g=g)
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(lr, i, total, warmup)
            loss, logits, _ = step(norm(raw), y, target)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{stage}: loss became {loss.item()} at epoch {epoch} step {s}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            i += 1
            seen += y.shape[0]
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            if progress is not None:
                progress.step(loss.item(), correct / seen, seen / (time.perf_counter() - t0))
        acc = evaluate(val_model, val, norm.mean, norm.std, norm.device)
        row = {"stage": stage, "epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_acc": acc, "val_acc_ema": acc, "images_per_s": seen / (time.perf_counter() - t0),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        if progress is not None:
            progress.end_epoch(row)
    for m in modules:
        m.eval()
    return rows


def finetune_sub_teacher(teacher: nn.Module, classes: Sequence[int], train: data_mod.ImageData,
                         val: data_mod.ImageData, cfg: DevitConfig, norm: Norm, seed: int,
                         progress: Any = None, label: str = "") -> tuple[nn.Module, list[dict[str, Any]]]:
    """Stage 1: a copy of the teacher with a head for `classes` only (fresh, as the reference, or the teacher's
    own rows of those classes: cfg.sub_teacher_head), fine-tuned on that subset."""
    model = copy.deepcopy(teacher)
    for p in model.parameters():
        p.requires_grad_(True)
    old = model.get_classifier()
    model.reset_classifier(len(classes))
    if cfg.sub_teacher_head == "teacher_rows":
        with torch.no_grad():   # start from the teacher's own decision rule restricted to the subset
            model.head.weight.copy_(old.weight[list(classes)])
            model.head.bias.copy_(old.bias[list(classes)])

    def step(x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, dict[str, float]]:
        z = model(x)
        ce = soft_cross_entropy(z, target) if target is not None else \
            F.cross_entropy(z, y, label_smoothing=cfg.label_smoothing)
        return ce, z, {}

    rows = fit(f"{label}sub-teacher fine-tuning", [model], step, train, model, val, epochs=cfg.finetune_epochs,
               lr=cfg.finetune_lr, cfg=cfg, norm=norm, seed=seed, progress=progress, mix_classes=len(classes))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), rows


def distil_sub_model(student: nn.Module, sub_teacher: nn.Module, train: data_mod.ImageData,
                     val: data_mod.ImageData, cfg: DevitConfig, norm: Norm, seed: int,
                     progress: Any = None, label: str = "", epochs: int | None = None) -> list[dict[str, Any]]:
    """Stage 3: DEKD from the sub-teacher on its subset (hard KD + CE + middle-block Q/K/V relation KL), for
    `epochs` (default cfg.epochs; after pruning, cfg.prune_epochs)."""
    heads_t, heads_s = dekd.num_heads(sub_teacher), dekd.num_heads(student)
    cap_t = FeatureCapture(sub_teacher, [dekd.qkv_path(sub_teacher)], detach=True)
    cap_s = FeatureCapture(student, [dekd.qkv_path(student)])

    depth = dekd.depth(student)

    def step(x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, dict[str, float]]:
        with torch.no_grad():
            z_t = sub_teacher(x)
        z_s = student(x)
        (qkv_t,), (qkv_s,) = cap_t.outputs, cap_s.outputs
        rel = dekd.qkv_relation_terms(qkv_t, qkv_s, heads_t, heads_s, mode=cfg.relation_mode, student_depth=depth)
        loss, terms = dekd.dekd_loss(z_s, z_t, y, rel, alpha=cfg.alpha, gammas=cfg.gammas,
                                     label_smoothing=cfg.label_smoothing, target=target)
        return loss, z_s, terms

    with cap_t, cap_s:
        return fit(f"{label}DEKD sub-model", [student], step, train, student, val,
                   epochs=cfg.epochs if epochs is None else epochs, lr=cfg.lr, cfg=cfg, norm=norm, seed=seed,
                   progress=progress, mix_classes=student.num_classes)


def ranking_batches(train: data_mod.ImageData, cfg: DevitConfig, norm: Norm, seed: int) -> list[Tensor]:
    """Up to cfg.prune_images of the subset's training images (seeded choice, no augmentation, normalized), in
    near-equal batches of at most 64 (HSIC's kernels are batch x batch per unit), that stage 2 ranks the sub-model's
    heads and neurons on."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:cfg.prune_images]
    chunks = idx.tensor_split(max(1, math.ceil(len(idx) / 64)))
    return [norm(train.x[chunk].float() / 255) for chunk in chunks]


def teacher_outputs(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS feature after the final norm, logits) of a timm ViT in one pass."""
    cls = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    return cls, teacher.get_classifier()(cls)


def train_ensemble(ensemble: Ensemble, teacher: nn.Module, train: data_mod.ImageData, val: data_mod.ImageData,
                   cfg: DevitConfig, norm: Norm, seed: int, progress: Any = None) -> list[dict[str, Any]]:
    """Stage 4: sub-models and fusion head jointly, against the full teacher's CLS feature and predictions."""
    def step(x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, dict[str, float]]:
        with torch.no_grad():
            t_cls, z_t = teacher_outputs(teacher, x)
        h = ensemble.head.forward_features(torch.cat([p(x) for p in ensemble.parts], dim=1))
        z = ensemble.head.classifier(h)
        mse = F.mse_loss(h, t_cls)
        ce = F.cross_entropy(z, y, label_smoothing=cfg.label_smoothing)
        hard = F.cross_entropy(z, z_t.argmax(1))
        loss = cfg.feature_weight * mse + (1 - cfg.alpha) * ce + cfg.alpha * hard
        return loss, z, {"mse": mse.item(), "ce": ce.item(), "hard_kd": hard.item()}

    return fit("ensemble: sub-models + fusion head", [ensemble], step, train, ensemble, val,
               epochs=cfg.ensemble_epochs, lr=cfg.lr, cfg=cfg, norm=norm, seed=seed, progress=progress)
