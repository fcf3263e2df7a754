"""`effai sr export`: SRDiff's LR encoder and denoiser step lowered by effai's own targets (effai/export/targets), each
checked for parity in the target's runtime, plus an end-to-end check: the DDIM sampler around the exported step vs
around torch on a held-out photo crop (PSNR between the two outputs)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effai.errors import EffaiError, UsageError
from effai.files import atomic_write, replace_dir, staging_dir

PARITY_STEPS = 4


def export_sr(run: Path, target_name: str, out: Path, precision: str = "fp32", force: bool = False,
              log: Path | None = None, on_stage: Callable[[str], None] | None = None,
              max_psnr_drop: float | None = None, min_fidelity_db: float | None = None) -> dict[str, Any]:
    """One artifact dir `out` (encoder/, step/, sr.json) for one target; written in a temp dir, then renamed.
    Below fp32 (both parts at `precision`), the PSNR gate (effai/superres/gate.py) runs on held-out photos: a drop
    over `max_psnr_drop` dB (default gate.DEFAULT_MAX_DROP_DB) vs the fp32 model fails the export, nothing written;
    so do outputs further than `min_fidelity_db` dB PSNR from the fp32 model's, when given."""
    import torch

    from effai.export.parity import TOLERANCES, compare
    from effai.export.precisions import PRECISIONS
    from effai.export.quiet import captured
    from effai.export.targets import TARGETS
    from effai.export.targets.base import LowerOptions
    from effai.export.trace import trace
    from effai.superres import engine
    from effai.zoo import srdiff

    from effai.superres import quant

    target = TARGETS.get(target_name)
    refusal = precision_refusal(target_name, precision)
    if refusal:
        raise UsageError(refusal)
    static = PRECISIONS.get(precision).needs_calibration
    from effai.superres.gate import DEFAULT_MAX_DROP_DB

    max_drop = DEFAULT_MAX_DROP_DB if max_psnr_drop is None else float(max_psnr_drop)
    if not max_drop >= 0:
        raise UsageError(f"--max-psnr-drop {max_psnr_drop} must be a number of dB >= 0")
    if min_fidelity_db is not None and not min_fidelity_db > 0:
        raise UsageError(f"--min-fidelity {min_fidelity_db} must be a PSNR in dB > 0")
    ok, why = target.available()
    if not ok:
        raise UsageError(f"target {target_name} is not installed here: {why}")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it, or choose another --out")
    model, meta = srdiff.load(run)
    spec = model.spec
    step_mod = srdiff.DenoiserStep(model).eval()
    lr, up, noise = _parity_inputs(spec)
    with torch.no_grad():
        cond = model.encoder(torch.from_numpy(lr))
    examples = {"encoder": (torch.from_numpy(lr),),
                "step": (torch.from_numpy(noise), torch.tensor([float(spec.timesteps // 2)]), cond)}
    modules = {"encoder": model.encoder.eval(), "step": step_mod}
    names = {"encoder": (("lr",), ("cond",)), "step": (("x_t", "t", "cond"), ("eps",))}
    calib_lr, calib_steps = quant.calibration(model) if static else (None, [])
    tmp = staging_dir(out)
    report: dict[str, Any] = {"target": target_name, "precision": precision, "spec": spec.to_dict(),
                              "source": str(run), "method": (meta.get("train") or {}).get("method"), "parts": {}}
    try:
        for part in ("encoder", "step"):
            if on_stage:
                on_stage(part)
            d = tmp / part
            d.mkdir()
            ex = examples[part]
            t0 = time.perf_counter()
            with captured(log):
                if static and part == "step" and target_name == "executorch":   # 3 inputs: effai/superres/quant.py
                    lowered = quant.lower_step_executorch_int8(modules[part], ex, calib_steps, names[part][0],
                                                               names[part][1], d)
                elif static and part == "step":    # onnx: the fp32 graph, then static int8 on the 3-input samples
                    prog = trace(modules[part], ex) if target.needs_exported_program else modules[part]
                    lowered = target.lower(prog, ex, LowerOptions(input_names=names[part][0],
                                                                  output_names=names[part][1]), d)
                    lowered = quant.quantize_step_onnx_int8(d, lowered, calib_steps)
                else:
                    prog = trace(modules[part], ex) if target.needs_exported_program else modules[part]
                    lowered = target.lower(prog, ex, LowerOptions(precision=precision, input_names=names[part][0],
                                                                  output_names=names[part][1],
                                                                  calibration=calib_lr), d)
            seconds = time.perf_counter() - t0
            entry: dict[str, Any] = {"lowered": {"model_file": lowered.model_file,
                                                 "inputs": [i.to_dict() for i in lowered.inputs],
                                                 "outputs": [o.to_dict() for o in lowered.outputs]},
                                     "details": _jsonable(lowered.details), "seconds": seconds}
            samples = _part_samples(part, model, spec, lr, cond.numpy(), noise)
            with torch.no_grad():
                outs = modules[part](*ex)
            structural = target.structural_check(d, lowered, {"precision": precision, "output_shapes": [
                tuple(outs.shape)], "input_shapes": [tuple(x.shape) for x in ex]})
            pred = target.load(d, lowered)
            if isinstance(pred, str):
                entry["parity"] = {"status": "not-run", "reason": pred}
                if structural is not None and structural.get("status") == "fail":
                    entry["parity"] = {"status": "fail", "reason": "structural check: "
                                       + "; ".join(structural.get("problems", []))}
            else:
                got, ref = [], []
                for ins, r in samples:
                    feed = ins
                    if part == "step":
                        order = engine._order_by_shape([tuple(i.shape) for i in lowered.inputs])
                        feed = [dict(zip(("x", "t", "cond"), ins))[k] for k in order]
                    got.append(np.asarray(pred.run(feed)[0]))
                    ref.append(r)
                entry["parity"] = {**compare([np.concatenate(ref)], [np.concatenate(got)], TOLERANCES[precision]),
                                   "runtime": pred.runtime, "samples": len(samples)}
            if structural is not None:
                entry["parity"]["structural"] = structural
            report["parts"][part] = entry
        atomic_write(tmp / engine.SR_JSON, json.dumps(report, indent=2) + "\n")
        if all(p["parity"]["status"] == "pass" for p in report["parts"].values()):
            report["sampler_parity"] = _sampler_parity(run, tmp, spec)
            if precision != "fp32":
                if on_stage:
                    on_stage("psnr gate")
                from effai.superres.gate import psnr_gate

                report["psnr_gate"] = psnr_gate(engine.torch_model(run), engine.artifact_model(tmp), max_drop,
                                                 min_fidelity_db=min_fidelity_db)
            atomic_write(tmp / engine.SR_JSON, json.dumps(report, indent=2) + "\n")
        failed = [k for k, p in report["parts"].items() if p["parity"]["status"] == "fail"]
        if failed:
            raise EffaiError(f"{target_name}: parity failed for {', '.join(failed)} "
                             f"({report['parts'][failed[0]]['parity'].get('reason')}); nothing was written")
        gate = report.get("psnr_gate") or {}
        if gate.get("status") == "fail":
            raise EffaiError(f"{target_name} {precision}: PSNR gate failed: {gate['reason']}; nothing was written "
                             "(pass a larger --max-psnr-drop / smaller --min-fidelity to accept it, or choose another "
                             "--quantize)")
        replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def precision_refusal(target_name: str, precision: str) -> str | None:
    """Why `effai sr export` cannot give `target_name` at `precision` (one line), or None when it can."""
    from effai.export.precisions import PRECISIONS
    from effai.export.targets import TARGETS
    from effai.superres.quant import STATIC_INT8_TARGETS

    target = TARGETS.get(target_name)
    if precision not in target.precisions:
        return f"--quantize {precision} is not offered by {target_name}; choose from: {', '.join(target.precisions)}"
    if PRECISIONS.get(precision).needs_calibration and target_name not in STATIC_INT8_TARGETS:
        return (f"--quantize {precision} of the SR step needs calibration of its three inputs (x_t, t, cond), which "
                f"effai does for {' and '.join(STATIC_INT8_TARGETS)} only; choose --target "
                f"{' or '.join(STATIC_INT8_TARGETS)}, or int8-dynamic, int8-weight or fp16 where {target_name} "
                "has them")
    return None


def _parity_inputs(spec: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from effai.data import sr as data

    name, hr, lr = data.eval_crops(spec.scale, spec.hr_size, per_photo=1)[0]
    lr_f = data.to_unit(lr)
    noise = np.random.default_rng(0).standard_normal((1, 3, spec.hr_size, spec.hr_size)).astype(np.float32)
    return lr_f.transpose(2, 0, 1)[None].copy(), data.upsample(lr_f, spec.scale).transpose(2, 0, 1)[None].copy(), noise


def _part_samples(part: str, model: Any, spec: Any, lr: np.ndarray, cond: np.ndarray,
                  noise: np.ndarray) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """(inputs, torch output) pairs: the encoder on two held-out LR crops; the step at 4 timesteps across [0, T)."""
    import torch

    from effai.data import sr as data

    out = []
    with torch.no_grad():
        if part == "encoder":
            for _, _, lr_u8 in data.eval_crops(spec.scale, spec.hr_size, per_photo=1):
                x = data.to_unit(lr_u8).transpose(2, 0, 1)[None].copy()
                out.append(([x], model.encoder(torch.from_numpy(x)).numpy()))
        else:
            for t in np.linspace(0, spec.timesteps - 1, 4).round():
                tt = np.array([t], np.float32)
                ref = model.denoiser(torch.from_numpy(noise), torch.from_numpy(tt), torch.from_numpy(cond)).numpy()
                out.append(([noise, tt, cond], ref))
    return out


def _sampler_parity(run: Path, artifact: Path, spec: Any) -> dict[str, Any]:
    """The full sampler (PARITY_STEPS DDIM steps, one tile) around torch and around the artifact: PSNR between the two
    HR outputs (uint8) and the largest pixel difference."""
    from effai.data import sr as data
    from effai.superres import engine

    _, hr, lr = data.eval_crops(spec.scale, spec.hr_size, per_photo=1)[0]
    a = engine.upscale(engine.torch_model(run), lr, spec.scale, PARITY_STEPS)
    b = engine.upscale(engine.artifact_model(artifact), lr, spec.scale, PARITY_STEPS)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {"steps": PARITY_STEPS, "max_pixel_diff": int(diff.max()),
            "psnr_vs_torch_db": None if mse == 0 else float(10 * np.log10(255 ** 2 / mse)), "identical": mse == 0}


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)
