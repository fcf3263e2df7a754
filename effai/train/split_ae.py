"""Feature autoencoders for split inference (MAHPPO): per split point and rate, train the autoencoder with the DNN
frozen, then fine-tune autoencoder + tail together; held-out top-1 and bytes per image for each.

    run = train_split_ae(SplitAEConfig(model="ghostnetv3_050.digits", out="runs/split_ae"))
Files (`split_ae.json`, one `ae_<point>_r<R>b<Q>.safetensors` each) and the measured table: docs/split.md.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import UsageError
from effai.files import atomic_write

SCHEMA = "effai.split-ae/1"
REPORT = "split_ae.json"


@dataclass(frozen=True)
class SplitAEConfig:
    model: str = "ghostnetv3_050.digits"       # zoo name (its card's eval data is used: digits for the default)
    weights: str | None = None                 # a checkpoint for the model (default: the card's own weights)
    out: str = "runs/split_ae"
    points: tuple[str, ...] = ()               # split points (default: every stage exit)
    rates: tuple[tuple[int, int], ...] = ((4, 4), (8, 2))   # (channel reduction, bits) per autoencoder; first = default
    epochs: int = 3                            # stage 1: autoencoder only, DNN frozen
    finetune_epochs: int = 1                   # stage 2: autoencoder + tail (the head stays frozen: it is on devices)
    batch_size: int = 32
    lr: float = 1e-2                           # Adam, stage 1 (cosine to 0)
    finetune_lr: float = 1e-3                  # Adam, stage 2 (cosine to 0)
    recon_weight: float = 1.0                  # L = CE(tail(x^), y) + w * ||x^ - x||^2 / Var(x)
    seed: int = 0
    train_limit: int | None = None             # only the first N training images (quick runs, tests)


def ae_file(point: str, reduction: int, bits: int) -> str:
    return f"ae_{point.replace('.', '_')}_r{reduction}b{bits}.safetensors"


def _data(loaded: Any, cfg: SplitAEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    from effai.data.datasets import load_part, normalized

    card = loaded.card
    spec = card.extra.get("eval_data")
    if not spec:
        raise UsageError(f"{card.name} has no labelled data on its card (eval_data); train split autoencoders on a "
                         "model trained by effai, e.g. ghostnetv3_050.digits")
    c, h, _ = card.input_size
    split = card.extra.get("split")
    tr, _ = load_part(spec, h, c, split, "train")
    va, what = load_part(spec, h, c, split, "val")
    return (normalized(tr.x, card.mean, card.std), tr.y, normalized(va.x, card.mean, card.std), va.y, what)


def _features(head: nn.Module, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([head(x[i:i + bs]) for i in range(0, x.shape[0], bs)])


def _top1(fn: Callable[[torch.Tensor], torch.Tensor], f: torch.Tensor, y: torch.Tensor, bs: int = 256) -> float:
    with torch.no_grad():
        pred = torch.cat([fn(f[i:i + bs]).argmax(1) for i in range(0, f.shape[0], bs)])
    return float((pred == y).float().mean())


def _fit(ae: nn.Module, tail: nn.Module, f: torch.Tensor, y: torch.Tensor, params: list[torch.nn.Parameter],
         epochs: int, lr: float, cfg: SplitAEConfig, g: torch.Generator) -> float:
    """Adam on L = CE(tail(ae(f)), y) + w * mean((ae(f) - f)^2) / Var(f); the tail's BN statistics stay frozen."""
    if epochs <= 0:
        return float("nan")
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-f.shape[0] // cfg.batch_size))
    var = float(f.var()) or 1.0
    ae.train()
    tail.eval()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        perm = torch.randperm(f.shape[0], generator=g)
        for i in range(0, f.shape[0], cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            rec = ae(f[idx])
            loss = F.cross_entropy(tail(rec), y[idx]) + cfg.recon_weight * F.mse_loss(rec, f[idx]) / var
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    ae.eval()
    return float(loss.detach())


def train_split_ae(cfg: SplitAEConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every (point, rate) autoencoder; write the weights and `split_ae.json`; return the report."""
    from safetensors.torch import save_file

    from effai import zoo
    from effai.zoo.split import FeatureAE, split_model

    for r, b in cfg.rates:
        FeatureAE(max(r, 1), r, b)   # bits/reduction sanity before any work (UsageError listing the range)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    loaded = zoo.create(cfg.model, weights=cfg.weights)
    sm = split_model(loaded.model, loaded.card.input_size)
    points = [sm.point(p) for p in cfg.points] if cfg.points else sm.points
    xtr, ytr, xva, yva, what = _data(loaded, cfg)
    if cfg.train_limit is not None:
        xtr, ytr = xtr[: cfg.train_limit], ytr[: cfg.train_limit]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base_acc = _top1(loaded.model, xva, yva)
    rows = []
    for p in points:
        head, tail0 = sm.cut(p.name)
        ftr, fva = _features(head, xtr), _features(head, xva)
        c, h, w = p.shape
        for r, b in cfg.rates:
            if r > c:
                continue
            t0 = time.perf_counter()
            tail = copy.deepcopy(tail0)
            for q in tail.parameters():
                q.requires_grad_(False)
            ae = FeatureAE(c, r, b)
            _fit(ae, tail, ftr, ytr, list(ae.parameters()), cfg.epochs, cfg.lr, cfg, g)
            acc_frozen = _top1(lambda z: tail(ae(z)), fva, yva)
            for q in tail.parameters():
                q.requires_grad_(True)
            _fit(ae, tail, ftr, ytr, list(ae.parameters()) + list(tail.parameters()), cfg.finetune_epochs,
                 cfg.finetune_lr, cfg, g)
            tail.eval()
            acc = _top1(lambda z: tail(ae(z)), fva, yva)
            row = {"point": p.name, "feature_shape": list(p.shape), "reduction": r, "bits": b,
                   "code_shape": [ae.code_channels, h, w], "code_bytes": ae.code_bytes(h, w),
                   "feature_bytes_fp32": p.feature_bytes, "compression": p.feature_bytes / ae.code_bytes(h, w),
                   "val_top1_frozen": acc_frozen, "val_top1": acc, "val_top1_model": base_acc,
                   "file": ae_file(p.name, r, b), "seconds": round(time.perf_counter() - t0, 1)}
            tensors = {**{f"ae.{k}": v.detach().contiguous() for k, v in ae.state_dict().items()},
                       **{f"tail.{k}": v.detach().contiguous() for k, v in tail.state_dict().items()}}
            meta = {"schema": SCHEMA, "model": cfg.model, "weights_sha256": loaded.weights.sha256, "point": p.name,
                    "channels": str(c), "reduction": str(r), "bits": str(b), "val_top1": f"{acc:.6f}"}
            tmp = out / f".{row['file']}.tmp"
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(out / row["file"])
            rows.append(row)
            if progress:
                progress(f"{p.name} r{r} b{b}: {row['code_bytes']} B/image ({row['compression']:.0f}x), top-1 "
                         f"{acc_frozen:.2%} frozen -> {acc:.2%} fine-tuned (model {base_acc:.2%})")
    report = {"schema": SCHEMA, "config": asdict(cfg), "model": cfg.model, "weights_sha256": loaded.weights.sha256,
              "eval_data": what, "val_top1_model": base_acc, "input_bytes_u8": int(xva[0].numel()), "rows": rows}
    atomic_write(out / REPORT, json.dumps(report, indent=2) + "\n")
    return report


def load_ae(run_dir: Path, point: str, reduction: int | None = None, bits: int | None = None
            ) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """(FeatureAE with weights, its report row, the fine-tuned tail's state dict) for one point of a run.
    Without reduction/bits: the run's first rate."""
    from safetensors import safe_open

    from effai.files import read_json
    from effai.zoo.split import FeatureAE

    run_dir = Path(run_dir)
    rep = run_dir / REPORT
    if not rep.is_file():
        raise UsageError(f"{run_dir} has no {REPORT}; train autoencoders first: effai split-ae MODEL --out {run_dir}")
    report = read_json(rep, str(rep))
    rows = [r for r in report.get("rows", []) if r.get("point") == point
            and (reduction is None or r.get("reduction") == reduction) and (bits is None or r.get("bits") == bits)]
    if not rows:
        have = sorted({f"{r.get('point')} r{r.get('reduction')} b{r.get('bits')}" for r in report.get("rows", [])})
        raise UsageError(f"{run_dir} has no autoencoder for split point '{point}'"
                         f"{f' at r{reduction} b{bits}' if reduction else ''}; it has: {', '.join(have)}")
    row = rows[0]
    path = run_dir / Path(str(row["file"])).name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("point") != point:
        raise UsageError(f"{path} is the autoencoder of '{meta.get('point')}', not '{point}'; re-train the run")
    ae = FeatureAE(int(meta["channels"]), int(meta["reduction"]), int(meta["bits"]))
    ae.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ae.")})
    tail = {k[5:]: v for k, v in tensors.items() if k.startswith("tail.")}
    return ae.eval(), {**row, "model": report.get("model"), "weights_sha256": report.get("weights_sha256")}, tail
