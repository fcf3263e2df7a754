"""One training loop, readable top to bottom (nanoGPT style): `logits, losses = distiller(x, x_t, y)`, e.g.
CE_smooth(z_s, y) + kd_weight * L_kd(z_s, z_t, y) with z_t = teacher(x_t), on the SAME augmented batch.

SGD (AdamW for token models) + linear warmup + cosine, EMA of weights, bf16 autocast on GPU, DDP across processes
(each takes a slice of the global batch; BN statistics are synchronized), atomic checkpoints every epoch with exact
resume (the data order and augmentation of epoch e depend only on (seed, e)), metrics as JSONL, a rich progress bar.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import EffaiError, UsageError
from effai.train import checkpoint as ckpt
from effai.data import datasets as data_mod
from effai.train import distributed as ddp
from effai.train.distillers import build_distiller
from effai.train.evaluation import evaluate
from effai.train.models import build_student, load_teacher, save_model
from effai.train.optim import param_groups, warmup_cosine
from effai.train.recipes import TrainConfig

EpochHook = Callable[[int, nn.Module], None]


class TrainingDiverged(EffaiError):
    pass


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: Any = None,
          on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = ddp.init(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    check_out_dir(out, resume, force)
    if dist.main:
        ckpt.writable_run_dir(out)
    torch.manual_seed(cfg.seed)

    # --- data: the whole set in memory, a stratified seeded split ---------------------------------------------
    full = data_mod.load(cfg.data, cfg.input_size, cfg.channels)
    train_set, val_set = data_mod.split(full, cfg.val_fraction, split_seed(cfg))
    steps_per_epoch = batches_per_epoch(cfg, dist.world, len(train_set))

    # --- models -------------------------------------------------------------------------------------------------
    model, card = build_student(cfg, full.classes)
    teacher, t_card = load_teacher(cfg, full.classes) if cfg.teacher else (None, None)
    leak = split_leak_warning(cfg, t_card) if t_card is not None else None
    notes = [leak] if leak else []
    if notes and progress is not None and hasattr(progress, "console") and dist.main:
        progress.console.print(f"[yellow]! {notes[0]}[/]")
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    t_mean = torch.tensor(t_card.mean).view(1, -1, 1, 1) if t_card else mean   # the teacher's own preprocessing
    t_std = torch.tensor(t_card.std).view(1, -1, 1, 1) if t_card else std
    t_size = tuple(t_card.input_size[1:]) if t_card else tuple(card.input_size[1:])

    def teacher_view(raw: torch.Tensor) -> torch.Tensor:
        """The same images as the teacher expects them: its own resolution and normalization."""
        if tuple(raw.shape[-2:]) != t_size:
            raw = F.interpolate(raw, size=t_size, mode="bilinear", align_corners=False,
                                antialias=t_size[0] < raw.shape[-2])
        return (raw - t_mean) / t_std

    example = (train_set.x[:2].float() / 255 - mean) / std
    distiller = build_distiller(cfg, model, teacher, example, teacher_view(train_set.x[:2].float() / 255))
    distiller.to(device)
    aux = distiller.aux()                       # training-only modules (OFA projectors): trained, never exported
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    if dist.world > 1:
        ddp.convert_batchnorm(model, device)
        if aux is not None:
            ddp.convert_batchnorm(aux, device)
        net: nn.Module = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = distiller

    # --- optimizer and schedule ------------------------------------------------------------------------------------
    groups = param_groups([distiller], cfg.weight_decay)    # the student and aux; never the (frozen) teacher
    base_lr = cfg.lr * cfg.batch_size / 128
    opt = (torch.optim.AdamW(groups, lr=base_lr) if cfg.optimizer == "adamw"
           else torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, nesterov=True))
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        return warmup_cosine(base_lr, step, total_steps, warmup_steps)

    # --- resume -----------------------------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    last = out / "checkpoint.pt"
    if resume and last.is_file():
        state = ckpt.load(last)
        model.load_state_dict(state["model"])
        if aux is not None:
            aux.load_state_dict(state["aux"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        ckpt.set_rng_state(state["rng"])
    metrics_path = out / "metrics.jsonl"
    if dist.main:   # rows of epochs the checkpoint does not hold (a crash between row and checkpoint) are redone
        ckpt.truncate_metrics(metrics_path, "epoch", start_epoch - 1 if start_epoch else None)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.amp and device.type == "cuda") else nullcontext()
    local = cfg.batch_size // dist.world
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)   # data order + augmentation of this epoch
        perm = torch.randperm(len(train_set), generator=g)
        net.train()
        distiller.set_epoch(epoch)                                       # DKD's warm-up follows the epoch
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        if progress:
            progress.start_epoch(epoch, cfg.epochs, steps_per_epoch)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            raw = data_mod.augment(train_set.x[idx].float() / 255, g, hflip=bool(cfg.hflip), jitter=cfg.jitter)
            raw, y = raw[dist.rank * local:(dist.rank + 1) * local], train_set.y[idx][dist.rank * local:(dist.rank + 1) * local]
            x, y = ((raw - mean) / std).to(device), y.to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x_t = teacher_view(raw).to(device) if teacher is not None else None
            with autocast:
                logits, losses = net(x, x_t, y)
                loss = sum(losses.values())
            if not ddp.all_ranks_true(bool(torch.isfinite(loss)), device):
                kept = f"the last good checkpoint (epoch {start_epoch + len(history) - 1}) is kept at {last}" \
                    if last.is_file() else "no checkpoint was written yet"
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch} step {i}; {kept}; "
                                       "lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            seen += y.shape[0]
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            if progress:
                progress.step(loss.item(), correct / seen, seen * dist.world / (time.perf_counter() - t0))
        loss_sum, correct, seen = ddp.sum_over_ranks(loss_sum, correct, seen)   # metrics of the global batch
        row = {"epoch": epoch, "step": step, "lr": lr_at(step - 1), "train_loss": loss_sum / seen,
               "train_acc": correct / seen, "val_acc": evaluate(model, val_set, mean, std, device),
               "val_acc_ema": evaluate(ema, val_set, mean, std, device),
               "images_per_s": seen / (time.perf_counter() - t0),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if dist.main:   # the row first, then the checkpoint: see ckpt.truncate_metrics for why this order
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            ckpt.save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                              **({"aux": aux.state_dict()} if aux is not None else {}),
                              "epoch": epoch, "step": step, "rng": ckpt.rng_state(), "config": cfg.to_dict()}, last)
        if progress:
            progress.end_epoch(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)

    in_sync = ddp.all_equal_params(model)
    final = _pick_final(model, ema, history)
    result = {"config": cfg.to_dict(), "classes": full.classes, "dataset": {"source": full.source,
              "fingerprint": full.fingerprint(), "train": len(train_set), "val": len(val_set)},
              "world_size": dist.world, "ranks_in_sync": in_sync, "history": history, "warnings": notes}
    if dist.main:
        result.update(save_model(final["model"], card, cfg, out, val_set, result, final["which"]))
    ddp.shutdown()
    return result


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    if (out / "checkpoint.pt").is_file() and not (resume or force):
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it, --force to start over, "
                         "or choose another --out")


def batches_per_epoch(cfg: TrainConfig, world: int, n_train: int) -> int:
    """Full global batches per epoch (drop_last), each split evenly over the `world` processes."""
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by --nproc {world}")
    if n_train < cfg.batch_size:
        raise UsageError(f"{n_train} training images are fewer than one batch of {cfg.batch_size}; lower "
                         "--batch-size")
    return n_train // cfg.batch_size


def preflight(cfg: TrainConfig, world: int, *, resume: bool, force: bool) -> None:
    """What every rank would refuse, checked once before `--nproc` starts ranks: run dir, data, batch split, models."""
    out = Path(cfg.out)
    check_out_dir(out, resume, force)
    ckpt.writable_run_dir(out)
    full = data_mod.load(cfg.data, cfg.input_size, cfg.channels)
    train_set, _ = data_mod.split(full, cfg.val_fraction, split_seed(cfg))
    batches_per_epoch(cfg, world, len(train_set))
    build_student(cfg, full.classes)
    if cfg.teacher:
        load_teacher(cfg, full.classes)


def split_seed(cfg: TrainConfig) -> int:
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def split_leak_warning(cfg: TrainConfig, t_card: Any) -> str | None:
    """A teacher trained on the same data with another split has seen part of this run's held-out images."""
    t_split = t_card.extra.get("split")
    if not t_split or t_split.get("data") != cfg.data:
        return None
    if (t_split.get("seed"), t_split.get("val_fraction")) == (split_seed(cfg), cfg.val_fraction):
        return None
    return (f"the teacher was trained on {cfg.data} with split seed {t_split.get('seed')}, this run holds out with "
            f"split seed {split_seed(cfg)}: the teacher has seen some held-out images, so held-out accuracy is "
            f"optimistic; pass --set split_seed={t_split.get('seed')} to use the teacher's split")


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


def _pick_final(model: nn.Module, ema: nn.Module, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Always the EMA weights: choosing between EMA and raw by held-out accuracy would bias the reported number."""
    return {"model": ema, "which": "ema"}
