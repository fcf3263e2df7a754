"""The PSNR gate of a quantized SR artifact (the accuracy gate of `effai export`, generalised to super-resolution):
the exported sampler's PSNR against the HR photos, on held-out crops, vs the fp32 model's at the same seed and steps.
The gate fails when the drop exceeds `max_drop_db`, or, when asked, when the outputs' PSNR against the fp32
model's falls below `min_fidelity_db`. The fp32 reference is the torch model, which the fp32 artifacts
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


def outputs(model: Any, spec: dict[str, Any], steps: int = GATE_STEPS, seed: int = 0) -> list[np.ndarray]:
    """`model`'s x`scale` outputs (uint8 HR) on the gate crops."""
    from effai.superres import engine

    return [engine.upscale(model, lr, int(spec["scale"]), steps, seed) for _, _, lr in crops(spec)]


def mean_psnr(model: Any, spec: dict[str, Any], steps: int = GATE_STEPS, seed: int = 0) -> float:
    """Mean PSNR (dB) of `model`'s x`scale` output against HR over the gate crops."""
    return float(np.mean([psnr(out, hr) for out, (_, hr, _) in zip(outputs(model, spec, steps, seed), crops(spec))]))


def psnr_gate(reference: Any, artifact: Any, max_drop_db: float = DEFAULT_MAX_DROP_DB,
              steps: int = GATE_STEPS, min_fidelity_db: float | None = None) -> dict[str, Any]:
    """{reference_psnr_db, artifact_psnr_db, drop_db, fidelity_psnr_db, status, ...} for two SRModels
    (engine.SRModel). Quality: the drop of PSNR against HR must be <= max_drop_db. Fidelity: the mean PSNR of the
    artifact's outputs against the reference's (inf when identical) is always reported, and gated when
    min_fidelity_db is given (a quantization that moves outputs toward bicubic can raise PSNR against HR while
    leaving the fp32 model's outputs behind)."""
    spec = reference.spec
    hrs = [hr for _, hr, _ in crops(spec)]
    ref_out, art_out = outputs(reference, spec, steps), outputs(artifact, spec, steps)
    ref = float(np.mean([psnr(o, h) for o, h in zip(ref_out, hrs)]))
    got = float(np.mean([psnr(o, h) for o, h in zip(art_out, hrs)]))
    fid = float(np.mean([psnr(a, b) for a, b in zip(art_out, ref_out)]))
    drop = ref - got
    out: dict[str, Any] = {"data": "held-out photos (chelsea, coffee)", "crops": len(hrs), "steps": steps, "seed": 0,
                           "reference": reference.runtime, "reference_psnr_db": round(ref, 4),
                           "artifact_psnr_db": round(got, 4), "drop_db": round(drop, 4), "max_drop_db": max_drop_db,
                           "fidelity_psnr_db": round(fid, 4) if np.isfinite(fid) else None,
                           "min_fidelity_db": min_fidelity_db}
    reasons = []
    if drop > max_drop_db:
        reasons.append(f"PSNR fell {drop:.2f} dB ({ref:.2f} -> {got:.2f} dB) > {max_drop_db} dB")
    if min_fidelity_db is not None and fid < min_fidelity_db:
        reasons.append(f"outputs are {fid:.2f} dB PSNR from the fp32 model's < {min_fidelity_db} dB")
    out["status"] = "fail" if reasons else "pass"
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out
