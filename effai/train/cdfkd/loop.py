"""CDFKD-MFS training loop, readable top to bottom (nanoGPT style). No real image is used to train the student.

Per iteration: 5 x student step (x = G(z), no grad; L_S -> SGD), then 1 x generator step (L_G = -disagreement +
BN-statistics prior -> Adam on G). Hao et al., IEEE TMM 2022, arXiv:2205.11845; losses in `effai.train.cdfkd.losses`;
evaluation, checkpoints, the attention stage: docs/distill.md, "effai/train/cdfkd/loop.py".
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import EffaiError, UsageError
from effai.files import atomic_write
from effai.train import checkpoint as ckpt
from effai.data import datasets as data_mod
from effai.train.cdfkd.config import CdfkdConfig
from effai.train.cdfkd.generator import Generator
from effai.train.cdfkd.losses import generator_loss, student_loss
from effai.zoo.cdfkd_student import MultiHeaderStudent, build_multi_header
from effai.train.cdfkd.teachers import TeacherEnsemble, load_teachers
from effai.train.evaluation import evaluate
from effai.train.optim import warmup_cosine

COLLAPSE_STD = 1e-4   # a generated batch with a smaller standard deviation is (nearly) constant: the generator died


class GeneratorCollapsed(EffaiError):
    pass


def train_cdfkd(cfg: CdfkdConfig, *, force: bool = False, progress: Any = None) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    _check_out(out, cfg, force)
    progress = _as_progress(progress)
    notes: list[str] = []

    # --- teachers: frozen, eval mode; pre-logits features and BatchNorm inputs by forward hooks --------------------
    teachers = load_teachers(cfg.teachers)
    card = teachers[0].card
    c, size = card.input_size[0], card.input_size[1]
    if cfg.input_size is not None and cfg.input_size != size:
        raise UsageError(f"--input-size {cfg.input_size} differs from the teachers' {size}; leave it out (the "
                         "student takes the teachers' input)")
    ensemble = TeacherEnsemble(teachers, cfg.bn_first_scale).to(device)
    if not any(len(b) for b in ensemble.bn):
        raise UsageError("no teacher has BatchNorm layers, but the generator needs their running statistics; use "
                         "unfolded CNN teachers (train them with fold=False so BatchNorm is kept)")
    for t, b in zip(teachers, ensemble.bn):
        if not len(b):
            notes.append(f"teacher {t.spec} has no BatchNorm: it adds no BN-statistics term to the generator loss")
            warnings.warn(notes[-1], stacklevel=2)

    # --- real data: ONLY the held-out evaluation (and the few attention samples) ----------------------------------
    full = data_mod.load(cfg.data, size, c)
    if len(full.classes) != card.num_classes:
        raise UsageError(f"--data {cfg.data} has {len(full.classes)} classes but the teachers predict "
                         f"{card.num_classes}; evaluate on the data the teachers were trained on")
    # the held-out split: the one the teachers trained with on this data (so none of them has seen it)
    splits = [t.split if t.split and t.split.get("data") == cfg.data else None for t in teachers]
    ref = next((sp for sp in splits if sp), None)
    split_seed, val_fraction = (ref["seed"], ref["val_fraction"]) if ref else (cfg.seed, cfg.val_fraction)
    if any(sp is None or (sp["seed"], sp["val_fraction"]) != (split_seed, val_fraction) for sp in splits):
        seen = [sp and (sp["seed"], sp["val_fraction"]) for sp in splits]
        notes.append(f"the teachers' held-out splits differ ({seen}, (seed, fraction) on {cfg.data}); the held-out "
                     f"split uses seed {split_seed}, fraction "
                     f"{val_fraction}, so it may overlap some teachers' training images and their accuracies are "
                     "optimistic")
        warnings.warn(notes[-1], stacklevel=2)
    train_set, val_set = data_mod.split(full, val_fraction, split_seed)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    ckpt.prepare_run_dir(out, force)     # inputs are valid: only now a --force run clears the old one
    teacher_acc = [evaluate(t.model, val_set, torch.tensor(t.card.mean).view(1, -1, 1, 1),
                            torch.tensor(t.card.std).view(1, -1, 1, 1), device) for t in teachers]

    # --- student (one backbone, one header per teacher) and generator ----------------------------------------------
    torch.manual_seed(cfg.seed)
    backbone_kwargs = {"channels": list(cfg.student_channels)} if cfg.student_channels else {}
    student = build_multi_header(len(full.classes), c, size, cfg.student, backbone_kwargs=backbone_kwargs,
                                 header_dims=[t.dim for t in teachers], aggregation=cfg.aggregation or "mean")
    student.to(device)
    generator = Generator(cfg.nz, size, c, kind=cfg.generator).to(device)
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.gen_lr)

    def lr_factor(it: int) -> float:   # cosine from 1 to 0 over the run, for both players
        return warmup_cosine(1.0, it, cfg.iterations)

    # --- resume ----------------------------------------------------------------------------------------------------
    last = out / "checkpoint.pt"
    start, history = 0, []
    if cfg.resume and last.is_file():
        state = ckpt.load(last)
        ckpt.check_same_run(state.get("config", {}), cfg.to_dict(), last)
        student.load_state_dict(state["student"])
        generator.load_state_dict(state["generator"])
        opt_s.load_state_dict(state["opt_s"])
        opt_g.load_state_dict(state["opt_g"])
        start, history = int(state["iteration"]), list(state["history"])
        ckpt.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    ckpt.truncate_metrics(out / "metrics.jsonl", "iteration", start if start else None)   # rows the checkpoint holds

    # --- the adversarial game ----------------------------------------------------------------------------------------
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    if progress:
        progress.start(cfg.iterations, start)
    try:
        for it in range(start, cfg.iterations):
            for g in opt_s.param_groups:
                g["lr"] = cfg.lr * lr_factor(it)
            for g in opt_g.param_groups:
                g["lr"] = cfg.gen_lr * lr_factor(it)
            student.train()
            generator.train()
            try:
                for _ in range(cfg.student_steps):
                    s_parts = student_step(student, generator, ensemble, opt_s, cfg)
                g_parts = generator_step(student, generator, ensemble, opt_g, cfg)
            except GeneratorCollapsed as e:
                kept = (f"the last good checkpoint (iteration {history[-1]['iteration']}) is kept at {last}"
                        if history and last.is_file() else "no checkpoint was written yet")
                raise GeneratorCollapsed(f"generator collapsed at iteration {it + 1}: {e}; {kept}; lower --lr or "
                                         "gen_lr and rerun with --force (or --set resume=true to continue from the "
                                         "checkpoint)") from None

            if progress:
                progress.update(it + 1, {**s_parts, **g_parts})
            if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
                acc, head_acc = _evaluate_heads(student, val_set, mean, std, device)
                row = {"iteration": it + 1, "lr": cfg.lr * lr_factor(it), **s_parts, **g_parts, "val_acc": acc,
                       "val_acc_heads": head_acc, "seconds": time.perf_counter() - t0}
                history.append(row)   # the row first, then the checkpoint: see ckpt.truncate_metrics for why
                with open(out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                ckpt.save_atomic({"student": student.state_dict(), "generator": generator.state_dict(),
                                  "opt_s": opt_s.state_dict(), "opt_g": opt_g.state_dict(), "iteration": it + 1,
                                  "rng": ckpt.rng_state(), "history": history, "config": cfg.to_dict(),
                                  "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}, last)
                if progress:
                    progress.evaluated(row)
    finally:
        if progress:
            progress.stop()
    minutes = (time.perf_counter() - t0) / 60

    # --- optional: attention aggregation from a few real TRAIN-split images, everything else frozen ---------------
    student.eval()
    val_acc_mean, head_acc = _evaluate_heads(student, val_set, mean, std, device)
    attention = None
    if student.attention is not None:
        attention = _train_attention(student, train_set, cfg, mean, std, device)
    val_acc = evaluate(student, val_set, mean, std, device)

    # --- save: one plain module whose card rebuilds it (`effai export --weights out/model.safetensors`) ------------
    # config.split_seed: the zoo reads it so `effai export --eval auto` uses the same held-out split
    record = {"recipe": "cdfkd", "config": {**cfg.to_dict(), "split_seed": split_seed, "val_fraction": val_fraction},
              "split_seed": split_seed,
              "dataset": {"source": full.source, "fingerprint": full.fingerprint(), "val": len(val_set),
                          "used_for": "held-out evaluation" + (" + attention samples" if attention else "")},
              "teachers": [{**t.summary(), "val_acc": a} for t, a in zip(teachers, teacher_acc)],
              "val_acc": val_acc, "val_acc_mean_of_headers": val_acc_mean, "val_acc_heads": head_acc,
              "attention": attention, "iterations": cfg.iterations, "minutes": minutes, "weights": "last",
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model_path = _save_student(student.cpu(), card, teachers[0].labels, record, history, out)
    return {"model_path": str(model_path), "val_acc": val_acc, "out": str(out), "val_acc_mean_of_headers": val_acc_mean,
            "val_acc_heads": head_acc, "teacher_val_acc": teacher_acc, "iterations": cfg.iterations,
            "minutes": minutes, "split_seed": split_seed, "attention": attention, "notes": notes, "history": history}


def student_step(student: MultiHeaderStudent, generator: nn.Module, ensemble: TeacherEnsemble,
                 opt: torch.optim.Optimizer, cfg: CdfkdConfig) -> dict[str, float]:
    """One SGD step of L_S on a fresh generated batch (generator and teachers without gradients)."""
    device = next(generator.parameters()).device
    with torch.no_grad():
        x = generator(torch.randn(cfg.batch_size, cfg.nz, device=device))
        _guard(x=x)
        t_logits, t_feats = ensemble.logits_and_features(x)
    s_logits, s_feats = student.forward_heads(x)
    loss, parts = student_loss(s_logits, t_logits, s_feats, t_feats, feat_weight=cfg.feat_weight,
                               ens_weight=cfg.ens_weight)
    _guard(loss=loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():   # how often the student's ensemble already agrees with the teachers' on G's images
        agree = (torch.stack(s_logits).mean(0).argmax(1) == torch.stack(t_logits).mean(0).argmax(1)).float().mean()
    return {**parts, "loss_s_total": loss.item(), "agreement": agree.item()}


def generator_step(student: MultiHeaderStudent, generator: nn.Module, ensemble: TeacherEnsemble,
                   opt: torch.optim.Optimizer, cfg: CdfkdConfig, z: torch.Tensor | None = None) -> dict[str, float]:
    """One Adam step of L_G: gradients flow through the (frozen) student and teachers into the generator only."""
    device = next(generator.parameters()).device
    z = torch.randn(cfg.batch_size, cfg.nz, device=device) if z is None else z
    x = generator(z)
    _guard(x=x)
    student.requires_grad_(False)
    try:
        s_logits, _ = student.forward_heads(x)
        t_logits, bn_terms = ensemble.logits_and_bn_terms(x)
        loss, parts = generator_loss(s_logits, t_logits, bn_terms, adv_weight=cfg.adv_weight, bn_weight=cfg.bn_weight)
        _guard(loss=loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    finally:
        student.requires_grad_(True)
    return {**parts, "loss_g_total": loss.item()}


def collapse_reason(x: torch.Tensor | None = None, loss: torch.Tensor | None = None) -> str | None:
    """Why a generated batch or a loss means the game broke down, or None."""
    if x is not None:
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            return "non-finite generated images"
        if float(x.std()) < COLLAPSE_STD:
            return f"a (nearly) constant generated batch (std {float(x.std()):.1e} < {COLLAPSE_STD:g})"
    if loss is not None and not bool(torch.isfinite(loss)):
        return f"a {loss.item()} loss"
    return None


def _guard(x: torch.Tensor | None = None, loss: torch.Tensor | None = None) -> None:
    reason = collapse_reason(x, loss)
    if reason:
        raise GeneratorCollapsed(reason)


@torch.no_grad()
def _evaluate_heads(student: MultiHeaderStudent, val: data_mod.ImageData, mean: torch.Tensor, std: torch.Tensor,
                    device: torch.device, batch: int = 256) -> tuple[float, list[float]]:
    """Top-1 of the mean of the headers, and of each header."""
    was = student.training
    student.eval()
    correct, heads = 0, [0] * len(student.headers)
    for i in range(0, len(val), batch):
        x = ((val.x[i:i + batch].float() / 255 - mean) / std).to(device)
        y = val.y[i:i + batch].to(device)
        logits, _ = student.forward_heads(x)
        correct += int((torch.stack(logits).mean(0).argmax(1) == y).sum())
        for h, z in enumerate(logits):
            heads[h] += int((z.argmax(1) == y).sum())
    student.train(was)
    n = max(1, len(val))
    return correct / n, [h / n for h in heads]


def _train_attention(student: MultiHeaderStudent, train_set: data_mod.ImageData, cfg: CdfkdConfig,
                     mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """CE on `real_samples` stratified TRAIN-split images; backbone and headers frozen (their outputs cached)."""
    idx = stratified_indices(train_set.y, cfg.real_samples, cfg.seed)
    x = ((train_set.x[idx].float() / 255 - mean) / std).to(device)
    y = train_set.y[idx].to(device)
    with torch.no_grad():
        logits, feats = student.forward_heads(x)
    att = student.attention
    assert att is not None
    opt = torch.optim.Adam(att.parameters(), lr=cfg.attention_lr, weight_decay=1e-4)
    for _ in range(cfg.attention_steps):
        loss = F.cross_entropy(att(logits, feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = att.weights(feats).mean(0)
    return {"samples": len(idx), "steps": cfg.attention_steps, "final_loss": float(loss),
            "mean_weights": [float(v) for v in w]}


def stratified_indices(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices taken round-robin over classes, each class in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(y == c).flatten() for c in torch.unique(y).tolist()]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    picked: list[int] = []
    for i in range(max(len(p) for p in per_class)):
        for p in per_class:
            if i < len(p) and len(picked) < n:
                picked.append(int(p[i]))
    if len(picked) < n:
        raise UsageError(f"--real-samples {n} exceeds the {len(picked)} training images; use fewer")
    return torch.tensor(sorted(picked))


def _save_student(student: MultiHeaderStudent, card: Any, labels: list[str], record: dict[str, Any],
                  history: list[dict[str, Any]], out: Path) -> Path:
    backbone = student.arch_kwargs["backbone"]
    card_json = card.with_(name=f"cdfkd_{backbone}", family="cdfkd", source="effai:cdfkd_student",
                           num_classes=student.num_classes, extra={"arch_kwargs": student.arch_kwargs}).to_dict()
    path = ckpt.write_model(out / "model.safetensors", student, card_json, record, labels=labels)
    atomic_write(out / "train_record.json", json.dumps({**record, "history": history}, indent=2) + "\n")
    return path


def _check_out(out: Path, cfg: CdfkdConfig, force: bool) -> None:
    ckpt.refuse_existing_run(out, finished=out / "model.safetensors", started=(out / "checkpoint.pt",),
                             resume=cfg.resume, force=force)




class CdfkdProgress:
    """A rich progress bar over iterations (losses and teacher agreement live), one line per evaluation."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.bar: Any = None
        self.task: Any = None

    def start(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("cdfkd"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                            TimeRemainingColumn(), console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("cdfkd", total=total, completed=done, stats="")

    def update(self, done: int, stats: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, stats=f"L_S {stats['loss_s_total']:.3f} "
                            f"L_G {stats['loss_g_total']:.3f} agree {stats['agreement']:.0%}")

    def evaluated(self, row: dict[str, Any]) -> None:
        heads = " ".join(f"{a:.1%}" for a in row["val_acc_heads"])
        self.console.print(f"[green]✓[/] iteration {row['iteration']:>5}  val {row['val_acc']:.1%}  heads {heads}  "
                           f"agree {row['agreement']:.0%}  {row['seconds']:.0f}s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _as_progress(progress: Any) -> Any:
    """Our own progress object, from None, a CdfkdProgress, or any object with a rich `console` (the loop's)."""
    if progress is None or isinstance(progress, CdfkdProgress) or hasattr(progress, "evaluated"):
        return progress
    console = getattr(progress, "console", None)
    return CdfkdProgress(console) if console is not None else None
