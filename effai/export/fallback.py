"""The automatic float-layer fallback: when a quantized export fails its gate (parity or `--max-drop`), rank the
layers the backend quantizes by one-at-a-time sensitivity (effai.export.sensitivity) and re-export keeping the top
k = 1, 2, 4, ... in float until the gate passes, recording every attempt (size, parity, top-1, drop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from effai.export.sensitivity import fallback_schedule, layer_sensitivity
from effai.export.targets.base import LayerRule

Attempt = Callable[[tuple[str, ...], str], tuple[Any, dict[str, Any], dict[str, Any] | None]]


def gate_failed(parity: dict[str, Any], accuracy: dict[str, Any] | None) -> bool:
    return parity["status"] == "fail" or (accuracy is not None and accuracy["status"] == "fail")


def run(attempt: Attempt, first: tuple[Any, dict[str, Any], dict[str, Any] | None], *, model: nn.Module,
        calib_x: np.ndarray, precision: str, rule: LayerRule, float_layers: tuple[str, ...], stage: Any,
        size_mb: Callable[[Any], float]) -> tuple[tuple[Any, dict[str, Any], dict[str, Any] | None], dict[str, Any],
                                                   str | None]:
    """(the last attempt's (lowered, parity, accuracy), the manifest's `fallback` record, a warning or None)."""
    lowered, parity, accuracy = first
    record: dict[str, Any] = {"reason": (accuracy or {}).get("reason") or parity.get("reason"), "attempts": []}
    with stage("sensitivity", f"{precision}, one layer at a time") as note:
        ranking = layer_sensitivity(model, calib_x, precision, rule)
        note["detail"] = (f"{len(ranking)} layers; most sensitive {ranking[0][0]} ({ranking[0][1]:.2e})"
                          if ranking else "no quantizable layers")
    record["sensitivity_top"] = [{"layer": n, "score": sc} for n, sc in ranking[:16]]
    for k in fallback_schedule(len(ranking)):
        keep = tuple(dict.fromkeys(float_layers + tuple(n for n, _ in ranking[:k])))
        lowered, parity, accuracy = attempt(keep, f" ({len(keep)} float layers)")
        record["attempts"].append({
            "float_layers": len(keep), "mb": round(size_mb(lowered), 3),
            "parity": parity["status"], "cosine": parity.get("cosine"),
            "top1": (accuracy or {}).get("artifact", {}).get("top1"),
            "drop_points": (accuracy or {}).get("drop_points")})
        if not gate_failed(parity, accuracy):
            record["float_layers"] = list(keep)
            break
    record["status"] = "pass" if not gate_failed(parity, accuracy) else "fail"
    warning = None
    if record["status"] == "pass":
        kept = record["float_layers"]
        warning = (f"accuracy gate passed after keeping {len(kept)} most sensitive layer(s) in float: "
                   f"{', '.join(kept[:4])}" + (" ..." if len(kept) > 4 else ""))
    return (lowered, parity, accuracy), record, warning
