"""The PSNR gate of a quantized SR artifact (the accuracy gate of `effai export`, generalised to super-resolution):
the exported sampler's PSNR against the HR photos, on held-out crops, vs the fp32 model's at the same seed and steps.
The gate fails when the drop exceeds `max_drop_db`. The fp32 reference is the torch model, which the fp32 artifacts
match pixel for pixel (export's sampler parity), so this is the drop vs the fp32 artifact too."""

from __future__ import annotations

from typing import Any

import numpy as np

GATE_STEPS = 8             # `effai sr`'s default
GATE_CROPS_PER_PHOTO = 2   # x 2 held-out photos (chelsea, coffee)
DEFAULT_MAX_DROP_DB = 0.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images; inf when identical."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def crops(spec: dict[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Held-out (name, HR, LR) crops twice the trained HR tile per side (so tiling and blending are in the loop)."""
    from effai.data import sr as data

    return data.eval_crops(int(spec["scale"]), 2 * int(spec["lr_size"]) * int(spec["scale"]),
                           per_photo=GATE_CROPS_PER_PHOTO)


def mean_psnr(model: Any, spec: dict[str, Any], steps: int = GATE_STEPS, seed: int = 0) -> float:
    """Mean PSNR (dB) of `model`'s x`scale` output against HR over the gate crops."""
    from effai.superres import engine

    return float(np.mean([psnr(engine.upscale(model, lr, int(spec["scale"]), steps, seed), hr)
                          for _, hr, lr in crops(spec)]))


def psnr_gate(reference: Any, artifact: Any, max_drop_db: float = DEFAULT_MAX_DROP_DB,
              steps: int = GATE_STEPS) -> dict[str, Any]:
    """{reference_psnr_db, artifact_psnr_db, drop_db, max_drop_db, status, ...} for two SRModels (engine.SRModel)."""
    spec = reference.spec
    ref = mean_psnr(reference, spec, steps)
    got = mean_psnr(artifact, spec, steps)
    drop = ref - got
    out = {"data": "held-out photos (chelsea, coffee)", "crops": len(crops(spec)), "steps": steps, "seed": 0,
           "reference": reference.runtime, "reference_psnr_db": round(ref, 4), "artifact_psnr_db": round(got, 4),
           "drop_db": round(drop, 4), "max_drop_db": max_drop_db,
           "status": "pass" if drop <= max_drop_db else "fail"}
    if out["status"] == "fail":
        out["reason"] = f"PSNR fell {drop:.2f} dB ({ref:.2f} -> {got:.2f} dB) > {max_drop_db} dB"
    return out
