"""Parity: does the exported artifact, in its real runtime, compute what the torch fp32 model computes?

Metrics: max / mean absolute error, the error relative to max|ref|, the worst per-sample cosine and top-1 agreement
(reported, not gated). Tolerances (relative max abs error, minimum cosine): fp32 1e-3 and 0.9999, fp16 3e-2 and
0.999. Why these values: docs/manifest.md, "effai/export/parity.py".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rel_max_abs_err: float | None      # None: not gated (quantized precisions)
    min_cosine: float


TOLERANCES = {"fp32": Tolerance(1e-3, 0.9999), "fp16": Tolerance(3e-2, 0.999)}
# Quantized artifacts differ from fp32 by design, so parity only guards against broken exports (a wrong scale, a
# dropped requantization: cosine far below 0.9); whether the accuracy is good enough is the accuracy gate's call
# (--eval, --max-drop). The cosine floors sit under what correct artifacts of the zoo measure (see
# docs/quantization.md) with margin: int8 0.98+, 4-bit 0.95+.
_QUANT = {"int8": 0.95, "int8-dynamic": 0.95, "int8-weight": 0.98, "int4-weight": 0.9, "palette8": 0.98,
          "palette6": 0.95, "palette4": 0.9}
TOLERANCES.update({k: Tolerance(None, v) for k, v in _QUANT.items()})


def compare(reference: list[np.ndarray], got: list[np.ndarray], tol: Tolerance) -> dict[str, Any]:
    """Metrics for one artifact: reference and got are per-output arrays with the sample axis first."""
    if len(reference) != len(got):
        return {"status": "fail", "reason": f"artifact has {len(got)} outputs, reference has {len(reference)}"}
    errs, cosines, agree, total = [], [], 0, 0
    for r, g in zip(reference, got):
        g = np.asarray(g, np.float32).reshape(r.shape) if g.size == r.size else g
        if g.shape != r.shape:
            return {"status": "fail", "reason": f"output shape {g.shape} differs from reference {r.shape}"}
        errs.append(np.abs(g.astype(np.float64) - r.astype(np.float64)))
        rf, gf = r.reshape(r.shape[0], -1).astype(np.float64), g.reshape(g.shape[0], -1).astype(np.float64)
        denom = np.linalg.norm(rf, axis=1) * np.linalg.norm(gf, axis=1)
        cosines.extend(np.where(denom > 0, (rf * gf).sum(1) / np.maximum(denom, 1e-300), 1.0).tolist())
        if r.ndim == 2 and r.shape[1] > 1:
            agree += int((r.argmax(1) == g.argmax(1)).sum())
            total += r.shape[0]
    err = np.concatenate([e.ravel() for e in errs])
    scale = max(float(np.abs(r).max()) for r in reference) or 1.0
    max_abs, rel = float(err.max()), float(err.max()) / scale
    cos = float(min(cosines))
    finite = all(np.isfinite(g).all() for g in got)
    rel_ok = tol.rel_max_abs_err is None or rel <= tol.rel_max_abs_err
    ok = finite and rel_ok and cos >= tol.min_cosine
    out: dict[str, Any] = {
        "status": "pass" if ok else "fail",
        "max_abs_err": max_abs,
        "mean_abs_err": float(err.mean()),
        "rel_err": rel,
        "output_scale": scale,
        "cosine": cos,
        "top1_agreement": agree / total if total else None,
        "tolerance": {"rel_max_abs_err": tol.rel_max_abs_err, "min_cosine": tol.min_cosine},
    }
    if not ok:
        why = "non-finite outputs" if not finite else (
            f"relative error {rel:.3g} > {tol.rel_max_abs_err:g}" if not rel_ok
            else f"cosine {cos:.6f} < {tol.min_cosine}")
        out["reason"] = why
    return out


def check_artifact(target: Any, root: Any, lowered: Any, expected: dict[str, Any], batch: int,
                   samples: Callable[[], tuple[np.ndarray, list[np.ndarray]]]) -> dict[str, Any]:
    """Parity of an artifact dir in its target's host runtime; the structural check where no runtime exists here.

    `samples()` gives (inputs, torch reference outputs); it is only called when a runtime can run them."""
    structural = target.structural_check(root, lowered, expected)
    predictor = target.load(root, lowered)
    if isinstance(predictor, str):
        out: dict[str, Any] = {"status": "not-run", "reason": predictor}
        if structural is not None:
            out["structural"] = structural
            if structural["status"] == "fail":
                out["status"], out["reason"] = "fail", "structural check: " + "; ".join(structural["problems"])
        return out
    inputs, reference = samples()
    out = compare(reference, run_batched(predictor.run, inputs, batch), TOLERANCES[expected["precision"]])
    out.update(runtime=predictor.runtime, runtime_version=predictor.version)
    if structural is not None:
        out["structural"] = structural
    return out


def run_batched(run: Any, inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    """Feed N samples through a predictor whose input has a fixed batch size; stack per output."""
    outs: list[list[np.ndarray]] = []
    for i in range(0, inputs.shape[0], batch):
        res = run([np.ascontiguousarray(inputs[i:i + batch])])
        if not outs:
            outs = [[] for _ in res]
        for k, o in enumerate(res):
            outs[k].append(np.asarray(o))
    return [np.concatenate(o) for o in outs]
