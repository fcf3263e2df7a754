"""`effai train devit`: decompose a trained ViT into N small ViTs that infer collaboratively (Xu et al., "DeViT:
Decomposing Vision Transformers for Collaborative Inference in Edge Devices", IEEE TMC 2023, arXiv:2309.05015).
split (split.py) -> per subset: sub-teacher (stage 1), DEKD sub-model (stage 3), optional pruning (stage 2, prune.py)
-> sub-models + fusion head (stage 4). `devit.json`, written last, marks a finished run.
Steps and files written: docs/distill.md, "effai/train/devit/loop.py".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from effai import zoo
from effai.errors import UsageError
from effai.files import atomic_write, sha256
from effai.data import datasets as data_mod
from effai.train import checkpoint as ckpt
from effai.train.checkpoint import writable_run_dir
from effai.train.devit import dekd, prune, stages
from effai.train.devit.config import DevitConfig
from effai.zoo.devit_fusion import Ensemble, FusionHead
from effai.zoo.card import ModelCard
from effai.train.devit.split import ClassSplit, split_classes
from effai.train.evaluation import evaluate
from effai.train.models import load_teacher

STUDENTS = ("vit_pico", "vit_tiny", "vit_small")   # effai's token archs that take the image size


def train_devit(cfg: DevitConfig, *, force: bool = False, progress: Any = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    if (out / "devit.json").is_file() and not force:
        raise UsageError(f"{out} already holds a training run; pass --force to start over, or choose another --out")
    writable_run_dir(out)
    (out / "devit.json").unlink(missing_ok=True)   # --force: the old run is no longer complete
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)

    # --- teacher and data --------------------------------------------------------------------------------------------
    t_path, t_card0 = _teacher_card(cfg)
    channels, size = t_card0.input_size[0], t_card0.input_size[1]
    if cfg.input_size is not None and cfg.input_size != size:
        raise UsageError(f"--input-size {cfg.input_size}: the teacher's position embedding is fixed to {size}x{size}; "
                         f"omit --input-size or pass {size}")
    full = data_mod.load(cfg.data, size, channels)
    teacher, t_card = load_teacher(SimpleNamespace(teacher=str(t_path), teacher_weights=None, channels=channels),
                                   full.classes)
    teacher.to(device)
    dekd.middle_block(teacher)   # a ViT, or a clear error
    val_seed = _val_seed(cfg, t_card)
    train_set, val_set = data_mod.split(full, cfg.val_fraction, val_seed)
    split = split_classes(len(full.classes), cfg.parts, cfg.seed)
    norm = stages.Norm(torch.tensor(t_card.mean).view(1, -1, 1, 1), torch.tensor(t_card.std).view(1, -1, 1, 1),
                       device)
    patch = cfg.patch_size or int(teacher.patch_embed.patch_size[0])
    d_teacher = int(teacher.num_features)
    teacher_acc = evaluate(teacher, val_set, norm.mean, norm.std, device)
    init = _student_init(cfg)

    # --- stages 1 and 3, one part at a time (a sub-teacher is freed before the next one is made) ----------------------
    parts: list[nn.Module] = []
    part_reports: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    for i, classes in enumerate(split.subsets):
        tr_i, va_i = stages.subset_data(train_set, classes), stages.subset_data(val_set, classes)
        seed_i = cfg.seed + 1000 * (i + 1)
        t0 = time.perf_counter()
        sub_teacher, rows = stages.finetune_sub_teacher(teacher, classes, tr_i, va_i, cfg, norm, seed_i, progress,
                                                          label=f"part {i + 1}/{cfg.parts}: ")
        sub_teacher_acc = evaluate(sub_teacher, va_i, norm.mean, norm.std, device)
        history += [{**r, "part": i} for r in rows]
        t1 = time.perf_counter()
        torch.manual_seed(seed_i)
        student = _build_student(cfg, len(classes), channels, size, patch, t_card)
        if init is not None:
            _load_backbone(student, init, cfg.student_weights)
        student.to(device)
        _check_tokens(student, teacher)
        rows = stages.distil_sub_model(student, sub_teacher, tr_i, va_i, cfg, norm, seed_i, progress,
                                       label=f"part {i + 1}/{cfg.parts}: ")
        history += [{**r, "part": i} for r in rows]
        student_acc = evaluate(student, va_i, norm.mean, norm.std, device)
        pruning = _prune(student, sub_teacher, tr_i, va_i, cfg, norm, seed_i, progress, f"part {i + 1}/{cfg.parts}: ")
        history += [{**r, "part": i} for r in pruning.pop("history", [])]
        del sub_teacher
        student.reset_classifier(0)      # from here on the part outputs its CLS feature
        parts.append(student)
        part_reports.append({"index": i, "classes": list(classes), "class_names": [full.classes[c] for c in classes],
                             "sub_teacher_val_acc": sub_teacher_acc, "dekd_val_acc": student_acc,
                             **({"pruning": pruning} if pruning else {}),
                             "finetune_seconds": round(t1 - t0, 1), "dekd_seconds": round(time.perf_counter() - t1, 1)})

    # --- stage 4: ensemble --------------------------------------------------------------------------------------------
    d_sub = int(parts[0].num_features)
    torch.manual_seed(cfg.seed)
    ensemble = Ensemble(parts, FusionHead(cfg.parts, d_sub, d_teacher, len(full.classes))).to(device)
    t0 = time.perf_counter()
    rows = stages.train_ensemble(ensemble, teacher, train_set, val_set, cfg, norm, cfg.seed, progress)
    history += rows
    ensemble_seconds = time.perf_counter() - t0
    ensemble.eval().cpu()
    acc = evaluate(ensemble, val_set, norm.mean.cpu(), norm.std.cpu(), torch.device("cpu"))

    # --- write the parts, the fusion head, then devit.json ------------------------------------------------------------
    dataset = {"source": full.source, "fingerprint": full.fingerprint(), "train": len(train_set), "val": len(val_set),
               "val_seed": val_seed, "val_fraction": cfg.val_fraction, "classes": full.classes}
    # The training config is kept under "devit", not "config": a "config.data" would make `effai export` score a
    # checkpoint's outputs as class predictions on that data, and a part's outputs are features.
    record = {"recipe": "devit", "devit": cfg.to_dict(), "dataset": dataset, "teacher": str(t_path),
              "ensemble_val_acc": acc, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for i, (part, rep) in enumerate(zip(parts, part_reports)):
        card = ModelCard(name=f"devit_part{i}", family="devit", source=f"effai:{cfg.student}",
                         input_size=(channels, size, size), mean=t_card.mean, std=t_card.std, num_classes=0,
                         crop_pct=1.0, extra={"arch_kwargs": {"patch_size": patch,
                                                              **rep.get("pruning", {}).get("arch_kwargs", {})}}
                         ).to_dict()
        info = {"role": "part", "part": i, **_identity(split, d_sub, d_teacher), "classes": rep["classes"],
                "class_names": rep["class_names"]}
        path = out / f"part_{i}" / "model.safetensors"
        ckpt.write_model(path, part, card, {**record, "part": i}, devit=info)
        rep.update(path=str(path.relative_to(out)), sha256=sha256(path), params=_params(part), d_sub=d_sub,
                   runs_on=f"device {i} (rank {i + 1}): effai devit serve {out} --part {i} --coordinator HOST:PORT "
                           "--token-file FILE")
    head_card = ModelCard(name="devit_fusion", family="devit", source="effai:devit_fusion",
                          input_size=(cfg.parts * d_sub, 1, 1), mean=(0.0,), std=(1.0,), num_classes=len(full.classes),
                          crop_pct=1.0, extra={"arch_kwargs": {"parts": cfg.parts, "d_sub": d_sub,
                                                               "d_teacher": d_teacher}}).to_dict()
    head_path = out / "fusion" / "model.safetensors"
    ckpt.write_model(head_path, ensemble.head, head_card, {**record, "val_acc": acc}, labels=full.classes,
                     devit={"role": "fusion", **_identity(split, d_sub, d_teacher),
                            "subsets": [list(s) for s in split.subsets]})
    summary = {
        "method": "DeViT (arXiv:2309.05015)", "split": {**split.to_dict(), "class_names": full.classes},
        "split_hash": split.hash, "input": {"size": [channels, size, size], "mean": list(t_card.mean),
                                            "std": list(t_card.std), "patch_size": patch},
        "teacher": {"path": str(t_path), "model": t_card.source, "params": _params(teacher), "d_teacher": d_teacher,
                    "val_acc": teacher_acc},
        "parts": part_reports,
        "fusion": {"path": str(head_path.relative_to(out)), "sha256": sha256(head_path),
                   "params": _params(ensemble.head), "d_teacher": d_teacher,
                   "runs_on": f"coordinator (rank 0): effai devit run {out} --coordinator HOST:PORT --token-file FILE"},
        "val_acc": acc, "traffic_bytes_per_image": cfg.parts * d_sub * 4,
        "dataset": dataset, "config": cfg.to_dict(), "ensemble_seconds": round(ensemble_seconds, 1),
        "seconds": round(time.perf_counter() - t_start, 1), "history": history,
    }
    atomic_write(out / "devit.json", json.dumps(summary, indent=2) + "\n")
    return {"model_path": str(head_path), "val_acc": acc, "out": str(out), "teacher_val_acc": teacher_acc,
            "parts": [str(out / r["path"]) for r in part_reports], "split_hash": split.hash,
            "params_per_device": [r["params"] for r in part_reports], "teacher_params": _params(teacher),
            "traffic_bytes_per_image": cfg.parts * d_sub * 4, "seconds": summary["seconds"]}


def _prune(student: nn.Module, sub_teacher: nn.Module, train: data_mod.ImageData, val: data_mod.ImageData,
           cfg: DevitConfig, norm: stages.Norm, seed: int, progress: Any, label: str) -> dict[str, Any]:
    """Stage 2 on a distilled sub-model (in place): rank and cut its heads and MLP neurons, then recover by DEKD.
    Returns the report ({} when pruning is off), with the card options that rebuild the pruned model."""
    if cfg.prune_neurons == 0 and cfg.prune_heads == 0:
        return {}
    t0 = time.perf_counter()
    result = prune.prune_vit(student, stages.ranking_batches(train, cfg, norm, seed), neurons=cfg.prune_neurons,
                             heads=cfg.prune_heads)
    acc_cut = evaluate(student, val, norm.mean, norm.std, norm.device)
    rows = stages.distil_sub_model(student, sub_teacher, train, val, cfg, norm, seed + 1, progress,
                                   label=f"{label}pruned, ", epochs=cfg.prune_epochs)
    return {**result.to_dict(), "arch_kwargs": result.arch_kwargs(), "val_acc_after_cut": acc_cut,
            "val_acc_recovered": evaluate(student, val, norm.mean, norm.std, norm.device),
            "seconds": round(time.perf_counter() - t0, 1), "history": [{**r, "pruned": True} for r in rows]}


def _teacher_card(cfg: DevitConfig) -> tuple[Path, Any]:
    path = Path(cfg.teacher)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--teacher {cfg.teacher}: no such checkpoint; give the run dir or .safetensors of a ViT "
                         "(vit_tiny, vit_small, ...) trained by effai on the same --data")
    card = zoo.card_from_checkpoint(path)
    if card is None:
        raise UsageError(f"--teacher {path} carries no effai model card; use a checkpoint written by effai train")
    return path, card


def _val_seed(cfg: DevitConfig, t_card: Any) -> int:
    """The teacher's own held-out split when it was trained on this data, so its held-out images stay unseen."""
    if cfg.val_seed is not None:
        return cfg.val_seed
    split = t_card.extra.get("split", {})
    if split.get("data") == cfg.data and float(split.get("val_fraction", -1)) == cfg.val_fraction:
        return int(split.get("seed", cfg.seed))
    if split.get("data") == cfg.data:
        import warnings

        warnings.warn(f"the teacher held out {split.get('val_fraction')} of {cfg.data}, this run "
                      f"{cfg.val_fraction}: its held-out images overlap the teacher's training images, so held-out "
                      f"accuracies are optimistic; pass --set val_fraction={split.get('val_fraction')}", stacklevel=2)
    return cfg.seed


def _build_student(cfg: DevitConfig, num_classes: int, channels: int, size: int, patch: int, t_card: Any) -> nn.Module:
    if cfg.student not in STUDENTS:
        raise UsageError(f"--student {cfg.student}: DeViT sub-models are ViTs; choose one of: {', '.join(STUDENTS)}")
    card = zoo.resolve_card(cfg.student).with_(
        input_size=(channels, size, size), num_classes=num_classes, label_set=None, mean=t_card.mean, std=t_card.std,
        extra={"arch_kwargs": {"patch_size": patch}})
    if size % patch:
        raise UsageError(f"input size {size} is not a multiple of the patch size {patch}; set patch_size to a divisor")
    return zoo.build(card)


def _student_init(cfg: DevitConfig) -> dict[str, torch.Tensor] | None:
    """The backbone weights every sub-model starts from (classifier rows dropped: each part has its own classes)."""
    if cfg.student_weights is None:
        return None
    from effai.zoo.weights import read_state_dict

    path = Path(cfg.student_weights)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"student_weights {cfg.student_weights}: no such checkpoint; give an effai run dir or "
                         f".safetensors of a {cfg.student}")
    return {k: v for k, v in read_state_dict(path).items() if not k.startswith("head.")}


def _load_backbone(student: nn.Module, sd: dict[str, torch.Tensor], where: str | None) -> None:
    own = student.state_dict()
    bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not k.startswith("head.")]
    if bad or missing:
        raise UsageError(f"student_weights {where} do not fit the sub-model ({len(bad)} unknown or reshaped tensors, "
                         f"e.g. {(bad or missing)[0]}); give a checkpoint of the same architecture, input size and "
                         "patch size")
    student.load_state_dict(sd, strict=False)


def _check_tokens(student: nn.Module, teacher: nn.Module) -> None:
    n_s = student.patch_embed.num_patches + student.num_prefix_tokens
    n_t = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
    if n_s != n_t:
        raise UsageError(f"DEKD compares token relations: the sub-model has {n_s} tokens, the teacher {n_t}; use the "
                         "teacher's patch size (omit patch_size)")


def _identity(split: ClassSplit, d_sub: int, d_teacher: int) -> dict[str, Any]:
    return {"split_hash": split.hash, "parts": split.parts, "seed": split.seed, "d_sub": d_sub, "d_teacher": d_teacher}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
