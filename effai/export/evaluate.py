"""Accuracy of the torch model and of the exported artifact in its own runtime, on real labelled data.

`--eval digits|DIR|file.npz` (or the model card's own evaluation set): top-1 (and top-5 when there are >= 5
classes) for both, the drop in points, and a gate: the export fails when the artifact loses more than
`--max-drop` points against the torch fp32 model.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from effai.errors import UsageError
from effai.zoo.card import ModelCard


def eval_set(spec: str, card: ModelCard) -> tuple[np.ndarray, np.ndarray, str]:
    """(inputs N,C,H,W float32 preprocessed per the card, labels N, description). The card's held-out split is used
    when the data is the set it was trained on."""
    from effai.data import datasets as data_mod

    c, h, w = card.input_size
    if h != w:
        raise UsageError(f"--eval needs a square input; the export is {h}x{w}")
    data, what = data_mod.load_part(spec, h, c, card.extra.get("split"), "val")
    if len(data.classes) != card.num_classes:
        raise UsageError(f"--eval {spec} has {len(data.classes)} classes but the model predicts {card.num_classes}")
    x = data_mod.normalized(data.x, card.mean, card.std)
    return x.numpy(), data.y.numpy(), what


def topk(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    order = np.argsort(-logits, axis=1)
    out = {"top1": float((order[:, 0] == labels).mean())}
    if logits.shape[1] >= 5:
        out["top5"] = float((order[:, :5] == labels[:, None]).any(1).mean())
    return out


def run_all(run: Callable[[list[np.ndarray]], list[np.ndarray]], x: np.ndarray, batch: int) -> np.ndarray:
    """Logits for every sample through a fixed-batch predictor (the last batch is padded, then trimmed)."""
    outs = []
    for i in range(0, x.shape[0], batch):
        chunk = x[i:i + batch]
        n = chunk.shape[0]
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(np.asarray(run([np.ascontiguousarray(chunk)])[0])[:n])
    return np.concatenate(outs)


def accuracy_report(torch_logits: np.ndarray, artifact_logits: np.ndarray | None, labels: np.ndarray,
                    max_drop: float, what: str, reason: str | None = None) -> dict[str, Any]:
    ref = topk(torch_logits, labels)
    rep: dict[str, Any] = {"data": what, "samples": int(labels.shape[0]), "torch": ref, "max_drop_points": max_drop}
    if artifact_logits is None:
        rep.update(status="not-run", reason=reason)
        return rep
    art = topk(artifact_logits, labels)
    drop = 100 * (ref["top1"] - art["top1"])
    rep.update(artifact=art, drop_points=drop, status="pass" if drop <= max_drop else "fail")
    if rep["status"] == "fail":
        rep["reason"] = f"top-1 fell {drop:.2f} points ({ref['top1']:.2%} -> {art['top1']:.2%}) > {max_drop}"
    return rep
