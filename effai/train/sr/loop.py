"""The SRDiff / SAM-DiffSR training loop: random crops of real photos, L1 noise prediction (SPE-modulated noise for
SAM-DiffSR), a held-out noise-prediction loss, atomic checkpoints that resume bit-exactly (crops and noise are
seeded per iteration), and `model.safetensors` carrying the model spec (`effai.srdiff`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effai.data import sr as data
from effai.files import atomic_write
from effai.train import checkpoint as ckpt
from effai.train.sr.config import SrConfig
from effai.zoo import srdiff

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "model.safetensors", "train_record.json")


def train_sr(cfg: SrConfig, *, force: bool = False, progress: Any = None) -> dict[str, Any]:
    out = Path(cfg.out)
    _check_out(out, cfg, force)
    spec = cfg.spec()
    masks = cfg.masks if cfg.method == "sam-diffsr" else "none"
    src = data.training_images(cfg.data, masks, cfg.seed)
    if cfg.method == "sam-diffsr":
        src.encoded = [_encode(lab, cfg) for lab in src.labels]
    val = _val_batch(spec)
    ckpt.writable_run_dir(out)
    if force:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = srdiff.build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    last = out / "checkpoint.pt"
    start, history = 0, []
    if cfg.resume and last.is_file():
        state = ckpt.load(last)
        ckpt.check_same_run(state.get("config", {}), cfg.to_dict(), last,
                            ignore=("resume", "iterations", "eval_every", "threads"))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, history = int(state["iteration"]), list(state["history"])
    ckpt.truncate_metrics(out / "metrics.jsonl", "iteration", start if start else None)

    bar = _Progress(getattr(progress, "console", None)) if progress is not None else None
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    losses: list[float] = []
    if bar:
        bar.start(cfg.iterations, start, cfg.method)
    try:
        for it in range(start, cfg.iterations):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
            loss = _step(model, opt, src, cfg, spec, it)
            losses.append(loss)
            if bar:
                bar.update(it + 1, loss)
            if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
                row = {"iteration": it + 1, "train_loss": float(np.mean(losses)), "val_loss": _val_loss(model, val),
                       "seconds": time.perf_counter() - t0}
                losses = []
                history.append(row)   # the row first, then the checkpoint: see ckpt.truncate_metrics for why
                with open(out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                ckpt.save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "iteration": it + 1,
                                  "history": history, "config": cfg.to_dict()}, last)
                if bar:
                    bar.evaluated(row)
    finally:
        if bar:
            bar.stop()
    minutes = (time.perf_counter() - t0) / 60
    record = {"recipe": "sr", "method": cfg.method, "config": cfg.to_dict(), "iterations": cfg.iterations,
              "minutes": minutes, "val_loss": history[-1]["val_loss"] if history else None,
              "data": {"source": cfg.data, "images": src.names, "masks": masks,
                       "held_out": list(data.HELDOUT_PHOTOS) if cfg.data == "photos" else []},
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    card = _card(spec)
    model_path = ckpt.write_model(out / "model.safetensors", model.eval(), card, record, srdiff=spec.to_dict())
    atomic_write(out / "train_record.json", json.dumps({**record, "history": history}, indent=2) + "\n")
    return {"model_path": str(model_path), "val_acc": None, "val_loss": record["val_loss"], "out": str(out),
            "method": cfg.method, "iterations": cfg.iterations, "minutes": minutes, "history": history}


def _card(spec: srdiff.SRDiffSpec) -> dict[str, Any]:
    """The whole card (`effai.card`) of a trained run, so `effai zoo` / `effai export --weights` rebuild it as the
    zoo's srdiff_x2 is built (ARCHS "srdiff"; the LR tile side is the input size)."""
    from effai import zoo

    arch = {k: v for k, v in spec.to_dict().items() if k != "lr_size"}
    base = zoo.CARDS.get("srdiff_x2")
    return base.with_(name=f"srdiff_x{spec.scale}", input_size=(3, spec.lr_size, spec.lr_size),
                      extra={"arch_kwargs": arch}).to_dict()


def _encode(labels: np.ndarray, cfg: SrConfig) -> np.ndarray:
    e = srdiff.encode_masks(labels, cfg.spe)
    if cfg.spe_normalize and np.abs(e).max() > 0:
        e = e / np.abs(e).max()
    return e.astype(np.float32)


def _step(model: srdiff.SRDiff, opt: torch.optim.Optimizer, src: data.SRImages, cfg: SrConfig,
          spec: srdiff.SRDiffSpec, it: int) -> float:
    """One update; crops, t and eps come from generators seeded by (seed, iteration) so a resumed run repeats them."""
    rng = np.random.default_rng([cfg.seed, it])
    b = data.sample_batch(src, rng, cfg.batch_size, spec.hr_size, spec.scale)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    t = torch.randint(0, spec.timesteps, (cfg.batch_size,), generator=g)
    noise = torch.randn(b["hr"].shape, generator=g)
    enc = None if b["encoded"] is None else torch.from_numpy(b["encoded"])
    model.train()
    loss = model.loss(torch.from_numpy(b["hr"]), torch.from_numpy(b["lr"]), torch.from_numpy(b["lr_up"]), t, noise,
                      enc, cfg.spe_strength)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _val_batch(spec: srdiff.SRDiffSpec) -> dict[str, torch.Tensor]:
    """Fixed held-out crops (HELDOUT_PHOTOS) x 8 fixed timesteps x fixed noise: a deterministic val loss."""
    crops = []
    for name in data.HELDOUT_PHOTOS:
        img = data.photo(name)
        h, w = img.shape[:2]
        n = spec.hr_size
        for k in range(4):
            y, x = (h - n) * (k + 1) // 5, (w - n) * (4 - k) // 5
            crops.append(np.ascontiguousarray(img[y:y + n, x:x + n]))
    hr = np.stack([data.to_unit(c) for c in crops])
    lr = np.stack([data.to_unit(data.downsample(c, spec.scale)) for c in crops])
    up = np.stack([data.upsample(x, spec.scale) for x in lr])
    g = torch.Generator().manual_seed(12345)
    k = len(crops)
    t = torch.linspace(0, spec.timesteps - 1, k).round().long()
    to = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())   # noqa: E731
    return {"hr": to(hr), "lr": to(lr), "lr_up": to(up), "t": t, "noise": torch.randn(k, 3, spec.hr_size,
                                                                                        spec.hr_size, generator=g)}


@torch.no_grad()
def _val_loss(model: srdiff.SRDiff, v: dict[str, torch.Tensor]) -> float:
    model.eval()
    return float(model.loss(v["hr"], v["lr"], v["lr_up"], v["t"], v["noise"]))


def _check_out(out: Path, cfg: SrConfig, force: bool) -> None:
    ckpt.refuse_existing_run(out, finished=out / "model.safetensors", started=(out / "checkpoint.pt",),
                             resume=cfg.resume, force=force, resume_flag="--resume")




class _Progress:
    """A rich bar over iterations (loss live), one line per held-out evaluation."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.bar: Any = None

    def start(self, total: int, done: int, method: str) -> None:
        if self.console is None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(method), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                            TimeRemainingColumn(), console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task(method, total=total, completed=done, stats="")

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, stats=f"loss {loss:.4f}")

    def evaluated(self, row: dict[str, Any]) -> None:
        if self.console is not None:
            self.console.print(f"[green]✓[/] iteration {row['iteration']:>5}  train {row['train_loss']:.4f}  "
                               f"held-out {row['val_loss']:.4f}  {row['seconds']:.0f}s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
