"""Students and teachers for training, and the checkpoint `effai export` takes directly.

The saved `model.safetensors` carries its model card in the safetensors metadata (`effai.card`: architecture,
input size, mean/std, labels; `effai.train`: how it was trained and its held-out accuracy), so
`effai export --weights run/model.safetensors` needs no model name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effai import zoo
from effai.errors import UsageError
from effai.files import atomic_write
from effai.train import checkpoint as ckpt
from effai.train import distributed as ddp
from effai.train.recipes import TrainConfig
from effai.zoo.card import ModelCard

DIGITS_NORM = ((0.5,), (0.5,))


def build_student(cfg: TrainConfig, classes: list[str]) -> tuple[nn.Module, ModelCard]:
    card = zoo.resolve_card(cfg.student)
    c = int(cfg.channels or 3)
    mean, std = (card.mean, card.std) if c == 3 else DIGITS_NORM
    arch_kwargs: dict[str, Any] = {}
    if card.source.startswith("effai:ghostnetv3"):
        arch_kwargs = {"num_branches": cfg.num_branches, "scale_branch": cfg.scale_branch,
                       "identity_bn": cfg.identity_bn}
    card = card.with_(input_size=(c, cfg.input_size, cfg.input_size), num_classes=len(classes), label_set=None,
                      mean=mean, std=std, crop_pct=1.0, interpolation="bilinear",
                      extra={"labels": list(classes), "arch_kwargs": arch_kwargs})
    model = zoo.build(card)
    check_runs(model, card, "--student")
    return model, card


def check_runs(model: nn.Module, card: ModelCard, what: str) -> None:
    """A usage error now, before any epoch, when the model cannot take the run's input size (e.g. GhostNetV3's
    DFC gate below 64 px)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *card.input_size))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {card.name} cannot take {card.input_size[1]}x{card.input_size[2]} inputs ({first}); "
                         "choose another --input-size (GhostNetV3 needs at least 64)") from None
    finally:
        model.train(was)


def load_teacher(cfg: TrainConfig, classes: list[str]) -> tuple[nn.Module, ModelCard]:
    spec = cfg.teacher
    path = Path(spec)
    if path.is_dir():
        path = path / "model.safetensors"
    try:
        if path.suffix in (".safetensors", ".pt", ".pth") or path.exists():
            loaded = zoo.create(weights=path)
        else:
            if cfg.teacher_weights is None:
                raise UsageError(f"teacher '{spec}' has no weights: pass a checkpoint path (an effai training run or "
                                 ".safetensors), or --teacher-weights PATH")
            loaded = zoo.create(spec, weights=cfg.teacher_weights)
    except UsageError as e:
        raise UsageError(f"teacher cannot load: {e}") from e
    n = loaded.card.num_classes
    if n != len(classes):
        raise UsageError(f"teacher {loaded.card.name} predicts {n} classes but the data has {len(classes)}; "
                         "use a teacher trained on the same classes")
    if loaded.card.input_size[0] != (cfg.channels or 3):
        c = loaded.card.input_size[0]
        raise UsageError(f"teacher takes {c}-channel images, the student {cfg.channels}; train the student on the "
                         f"teacher's channels (--set channels={c})")
    names = zoo.labels(loaded.card)
    if names and not all(n.startswith("class_") for n in names) and list(names) != list(classes):
        raise UsageError(f"teacher classes {names[:5]}... differ from the data's {classes[:5]}... (names or order); "
                         "use a teacher trained on the same classes in the same order")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, loaded.card


def teacher_summary(cfg: TrainConfig) -> dict[str, Any] | None:
    """What the teacher was: its card and, for an effai-trained teacher, its own held-out accuracy."""
    if not cfg.teacher:
        return None
    path = Path(cfg.teacher)
    path = path / "model.safetensors" if path.is_dir() else path
    card = zoo.card_from_checkpoint(path) if path.is_file() else None
    if card is None:
        return {"spec": cfg.teacher, "weights": cfg.teacher_weights}
    rec = card.extra.get("train_record", {})
    return {"spec": cfg.teacher, "model": card.source, "val_acc": rec.get("val_acc"), "recipe": rec.get("recipe"),
            "epochs": rec.get("epochs")}


def save_model(model: nn.Module, card: ModelCard, cfg: TrainConfig, out: Path, val_set: Any,
               result: dict[str, Any], which: str) -> dict[str, Any]:
    """Fold (architectures with their own fold) and write model.safetensors + train_record.json atomically."""
    from effai.train.evaluation import evaluate

    model = ddp.revert_batchnorm(model).eval().cpu()
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    acc_before = evaluate(model, val_set, mean, std, torch.device("cpu"))
    arch_kwargs = dict(card.extra.get("arch_kwargs", {}))
    folded = False
    if cfg.fold and callable(getattr(model, "fold", None)) and card.source.startswith("effai:"):
        model.fold()
        arch_kwargs["deploy"] = True
        folded = True
    acc = evaluate(model, val_set, mean, std, torch.device("cpu"))
    record = {"recipe": cfg.recipe, "config": cfg.to_dict(), "dataset": result["dataset"], "weights": which,
              "teacher": teacher_summary(cfg),
              "val_acc": acc, "val_acc_before_fold": acc_before, "folded": folded,
              "epochs": len(result["history"]), "world_size": result["world_size"],
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    card_json = card.with_(extra={**card.extra, "arch_kwargs": arch_kwargs}).to_dict()
    ckpt.write_model(out / "model.safetensors", model, card_json, record, labels=card.extra["labels"])
    atomic_write(out / "train_record.json", json.dumps({**record, "history": result["history"]}, indent=2) + "\n")
    return {"model_path": str(out / "model.safetensors"), "val_acc": acc, "folded": folded}
