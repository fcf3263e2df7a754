"""effai's exported artifacts against the plain upstream flow of each target, side by side in one run.

    python benchmarks/export_matrix.py --models ghostnetv3_100,mobilenetv2_100,ghostnetv3_050.digits \
        --targets executorch,tflite,onnx,coreml --precisions all --runs 50 --threads 2

For every model x target x precision (the target's precisions, intersected with --precisions):

- effai: `export(zoo.create(model), ExportConfig(target, precision))`: fold, trace, lower, parity, accuracy gate.
  Recorded: model-file size, export seconds (every pipeline stage, verification included; `build_s` is the part
  without parity/eval/sensitivity/manifest), parity status, the manifest's accuracy, ExecuTorch delegation, warnings.
- upstream: each toolchain's own documented flow on the UNFOLDED model as `zoo.create` returns it (no effai
  folding or rewrites), at the same precision where the toolchain has a plain flow for it:
  executorch  torch.export -> to_edge_transform_and_lower(XnnpackPartitioner); int8 / int8-dynamic: PT2E with
              XNNPACKQuantizer (per-channel symmetric), calibrated on the same samples effai used (dynamic:
              the example input run once, so the per-channel weight observers see the weights).
  tflite      litert_torch.convert; int8: litert-torch's own PT2E path is tried (and reported), the upstream number
              is ai-edge-quantizer's preset recipe on the upstream float .tflite (static_wi8_ai8, dynamic_wi8_afp32,
              weight_only_wi8_afp32, weight_only_wi4_afp32); fp16 has no preset: n/a.
  onnx        torch.onnx.export(dynamo=True), no simplifier; int8: quantize_static with its defaults (QDQ,
              per-tensor, int8 activations), int8-dynamic: quantize_dynamic with its defaults.
  coreml      ct.convert(torch.jit.trace(...), mlprogram, iOS16) at fp16/fp32; compressed precisions with
              coremltools.optimize.coreml defaults (size and export time only); int8 (W8A8) needs macOS upstream.
  Float-graph conversions are cached per model: a quantized flow's time is float conversion + quantization.
- host latency: every artifact is loaded in its runtime with --threads threads (ExecuTorch, ai-edge-litert,
  onnxruntime; Core ML needs macOS) and `run` is timed on one fixed input: 5 warmup runs, then --runs timed runs,
  effai and upstream alternating in blocks of 10 so machine noise hits both alike. Median and p90 in ms.
- cosine: output vs the torch fp32 model (unfolded) on that same fixed input, for both; top-1 on the card's
  held-out set (the digits model) for both.

Reading the ratios (effai / upstream): latency <= 1.0 means effai's artifact is no slower; size < 1.0 means smaller;
export time > 1.0 is expected (effai verifies parity and accuracy, upstream does not). The ExecuTorch/LiteRT line
compares effai's own ExecuTorch and TFLite artifacts (fp32 vs fp32, int8 vs int8); the target is <= 1.2.

Results go to --out as JSON, rewritten after every row, so an interrupted run keeps what it measured.
Note: effai's Core ML export installs a coremltools fix (aten::Int folding under numpy 2, hit only by ViTs) that
stays active in this process for the upstream Core ML flow too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from effai import toolchain, zoo
from effai.export.pipeline import ExportConfig, ParityFailed, export
from effai.export.quiet import captured
from effai.export.targets import TARGETS

WARMUP = 5
BLOCK = 10          # timed runs per turn when effai and upstream alternate
Runner = Callable[[np.ndarray], np.ndarray]   # fixed input -> first output


class NotApplicable(Exception):
    """The upstream toolchain has no plain flow for this precision (recorded as n/a, not as a failure)."""


# ------------------------------------------------------------------------------------------------ the model case

class Case:
    """One model: the unfolded torch model, its fixed input and reference output, data shared by all targets."""

    def __init__(self, name: str, work: Path, calib_samples: int, log: Path) -> None:
        self.name, self.work, self.calib_samples, self.log = name, work, calib_samples, log
        self.loaded = zoo.create(name)
        self.model = self.loaded.model.eval()
        self.card = self.loaded.card
        self.eval = self._eval_set()
        self.x = self._fixed_input()
        with torch.no_grad():
            self.reference = _first(self.model(torch.from_numpy(self.x))).numpy()
        self.cache: dict[str, tuple[Path, float]] = {}   # upstream float conversions: key -> (file, seconds)
        self._calib: np.ndarray | None = None

    def _eval_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        spec = self.card.extra.get("eval_data")
        if not spec:
            return None
        from effai.export.evaluate import eval_set

        x, labels, _ = eval_set(spec, self.card)
        return x, labels

    def _fixed_input(self) -> np.ndarray:
        """The first held-out image when the card has labelled data, else the first parity photo."""
        if self.eval is not None:
            return np.ascontiguousarray(self.eval[0][:1])
        from effai.export.samples import parity_inputs

        x, _, _ = parity_inputs(self.card.preprocessing(), 1, 0, 0)
        return np.ascontiguousarray(x[:1], np.float32)

    @property
    def calib(self) -> np.ndarray:
        """The calibration samples effai's export uses (same source, count and seed)."""
        if self._calib is None:
            from effai.export import calibration

            self._calib = calibration.load("auto", self.card.preprocessing(), self.card, self.calib_samples).x
        return self._calib

    def float_artifact(self, key: str, build: Callable[[Path], None], path: Path) -> tuple[Path, float]:
        """Build an upstream float artifact once per model; (path, seconds it took)."""
        if key not in self.cache:
            t0 = time.perf_counter()
            build(path)
            self.cache[key] = (path, time.perf_counter() - t0)
        return self.cache[key]


def _first(out: Any) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


# ------------------------------------------------------------------------------------------------ effai side

def run_effai(case: Case, target: str, precision: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cfg = ExportConfig(target=target, precision=precision, out=out, calib_samples=args.calib_samples)
    error = None
    try:
        result = export(case.loaded, cfg)
    except ParityFailed as e:
        result, error = e.result, str(e)
    except Exception as e:  # EffaiError and anything a toolchain raises: recorded, the matrix goes on
        return {"error": _first_line(e)}
    m = result.manifest
    timings = m["timings_s"]
    rec: dict[str, Any] = {
        "path": str(result.out_dir / m["model_file"]),
        "mb": _manifest_mb(m),
        "export_s": round(sum(timings.values()), 3),
        "build_s": round(sum(v for k, v in timings.items() if k in ("fold", "calib", "trace", "lower")), 3),
        "timings_s": timings,
        "parity": {k: m["parity"].get(k) for k in ("status", "cosine", "max_abs_err", "reason") if k in m["parity"]},
        "accuracy": _accuracy_summary(m.get("accuracy")),
        "warnings": m.get("warnings", []),
    }
    if "delegation" in m.get("target_details", {}):
        rec["delegation"] = _delegation_short(m["target_details"]["delegation"])
    fallback = (m.get("quantization") or {}).get("fallback")
    if fallback:
        rec["fallback"] = {"status": fallback.get("status"), "reason": fallback.get("reason"),
                           "float_layers": fallback.get("float_layers", []), "attempts": len(fallback["attempts"])}
    if error:
        rec["error"] = error
    return rec


def _manifest_mb(m: dict[str, Any]) -> float:
    f = m["model_file"]
    return round(sum(e["bytes"] for e in m["files"] if e["path"] == f or e["path"].startswith(f + "/")) / 1e6, 3)


def _accuracy_summary(a: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a:
        return None
    return {"torch_top1": a["torch"]["top1"], "top1": a.get("artifact", {}).get("top1"), "status": a["status"],
            "samples": a["samples"]}


def _delegation_short(d: dict[str, Any]) -> dict[str, Any]:
    return {"partitions": d["partitions"], "non_delegated_ops": d["non_delegated_ops"]}


# ------------------------------------------------------------------------------------------------ upstream flows
# Each writes the artifact to `path` and returns extra details; raises NotApplicable or the toolchain's error.

def upstream_executorch(case: Case, precision: str, path: Path) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from effai.export.targets.executorch import delegation_summary

    x = (torch.from_numpy(case.x),)
    ep = torch.export.export(case.model, x)
    if precision in ("int8", "int8-dynamic"):
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                              get_symmetric_quantization_config)

        dynamic = precision == "int8-dynamic"
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                     is_dynamic=dynamic))
        ep = torch.export.export(_pt2e(ep.module(), quantizer, case.x if dynamic else case.calib), x)
    elif precision != "fp32":
        raise NotApplicable(f"no XNNPACK flow for {precision}")
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    delegation = delegation_summary(edge.exported_program().graph_module)
    path.write_bytes(edge.to_executorch().buffer)
    return {"delegation": _delegation_short(delegation)}


def _pt2e(module: torch.nn.Module, quantizer: Any, calib: np.ndarray, **convert_kwargs: Any) -> Any:
    """prepare_pt2e -> run `calib` one sample at a time -> convert_pt2e. Dynamic quantization gets the example
    input once, as the docs do: the per-channel weight observers only see the weights during a forward."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for i in range(calib.shape[0]):
            prepared(torch.from_numpy(calib[i:i + 1]))
    return convert_pt2e(prepared, **convert_kwargs)


AEQ_RECIPES = {"int8": "static_wi8_ai8", "int8-dynamic": "dynamic_wi8_afp32",
               "int8-weight": "weight_only_wi8_afp32", "int4-weight": "weight_only_wi4_afp32"}


def upstream_tflite(case: Case, precision: str, path: Path) -> dict[str, Any]:
    import litert_torch

    def convert(p: Path) -> None:
        litert_torch.convert(case.model, (torch.from_numpy(case.x),)).export(str(p))

    if precision == "fp32":
        convert(path)
        return {}
    if precision not in AEQ_RECIPES:
        raise NotApplicable(f"ai-edge-quantizer has no preset recipe for {precision}")
    extra = {"recipe": AEQ_RECIPES[precision]}
    if precision == "int8":
        extra["litert_torch_pt2e"] = _tflite_pt2e(case, path.with_name("model.pt2e.tflite"))
    float_path, float_s = case.float_artifact("tflite-fp32", convert, path.with_name("model.float.tflite"))
    t0 = time.perf_counter()
    extra["io_dtype"] = _aeq_quantize(case, float_path, precision, path)
    extra["float_s"], extra["quantize_s"] = round(float_s, 3), round(time.perf_counter() - t0, 3)
    return extra


def _tflite_pt2e(case: Case, path: Path) -> dict[str, Any]:
    """litert-torch's documented PT2E int8 path (PT2EQuantizer, per-channel, static); its outcome, not raised."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    x = (torch.from_numpy(case.x),)
    t0 = time.perf_counter()
    try:
        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                  is_dynamic=False))
        module = _pt2e(torch.export.export(case.model, x).module(), quantizer, case.calib, fold_quantize=False)
        litert_torch.convert(module, x, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    except Exception as e:
        return {"status": "failed", "error": _first_line(e)}
    return {"status": "ok", "path": str(path), "mb": _mb(path), "export_s": round(time.perf_counter() - t0, 3)}


def _aeq_quantize(case: Case, float_path: Path, precision: str, path: Path) -> str:
    """The recipe applied as published (no effai edits such as float I/O); returns the I/O dtypes it produced."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(float_path), getattr(recipe, AEQ_RECIPES[precision])())
    calib = None
    if q.need_calibration:
        runner = Interpreter(model_path=str(float_path)).get_signature_runner("serving_default")
        key = next(iter(runner.get_input_details()))
        data = [{key: case.calib[i:i + 1]} for i in range(case.calib.shape[0])]
        calib = q.calibrate({"serving_default": data})
    path.write_bytes(q.quantize(calib).quantized_model)
    interp = Interpreter(model_path=str(path))
    return "/".join(np.dtype(d[0]["dtype"]).name for d in (interp.get_input_details(), interp.get_output_details()))


def upstream_onnx(case: Case, precision: str, path: Path) -> dict[str, Any]:
    def convert(p: Path) -> None:
        torch.onnx.export(case.model, (torch.from_numpy(case.x),), str(p), dynamo=True)

    if precision == "fp32":
        convert(path)
        return {}
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    float_path, float_s = case.float_artifact("onnx-fp32", convert, path.with_name("model.float.onnx"))
    t0 = time.perf_counter()
    if precision == "int8":
        quantize_static(str(float_path), str(path), _OnnxCalibration(float_path, case.calib))
    elif precision == "int8-dynamic":
        quantize_dynamic(str(float_path), str(path))
    else:
        raise NotApplicable(f"no onnxruntime flow for {precision}")
    return {"float_s": round(float_s, 3), "quantize_s": round(time.perf_counter() - t0, 3)}


class _OnnxCalibration:
    """onnxruntime CalibrationDataReader: the calibration samples one at a time."""

    def __init__(self, model: Path, data: np.ndarray) -> None:
        import onnx

        self.name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        self.samples = iter(data[i:i + 1] for i in range(data.shape[0]))

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.samples, None)
        return None if x is None else {self.name: x}


def upstream_coreml(case: Case, precision: str, path: Path) -> dict[str, Any]:
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    def convert(compute: Any, deployment: Any) -> Any:
        with torch.no_grad():
            traced = torch.jit.trace(case.model, torch.from_numpy(case.x))
        return ct.convert(traced, inputs=[ct.TensorType(shape=case.x.shape)], convert_to="mlprogram",
                          compute_precision=compute, minimum_deployment_target=deployment)

    if precision in ("fp16", "fp32"):
        convert(ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32, ct.target.iOS16).save(str(path))
        return {}
    if precision == "int8":
        raise NotApplicable("linear_quantize_activations calibrates with MLModel.predict (needs macOS)")
    configs = {"int8-weight": cto.OpLinearQuantizerConfig(), "int4-weight": cto.OpLinearQuantizerConfig(dtype="int4"),
               "palette4": cto.OpPalettizerConfig(nbits=4), "palette6": cto.OpPalettizerConfig(nbits=6),
               "palette8": cto.OpPalettizerConfig(nbits=8)}
    if precision not in configs:
        raise NotApplicable(f"no coremltools flow for {precision}")
    deployment = "iOS18" if precision == "int4-weight" else "iOS16"   # int4 weights are an iOS18 op
    t0 = time.perf_counter()
    mlmodel = convert(ct.precision.FLOAT16, getattr(ct.target, deployment))
    float_s = time.perf_counter() - t0
    config = cto.OptimizationConfig(global_config=configs[precision])
    compress = cto.palettize_weights if precision.startswith("palette") else cto.linear_quantize_weights
    compress(mlmodel, config).save(str(path))
    return {"float_s": round(float_s, 3), "quantize_s": round(time.perf_counter() - t0 - float_s, 3),
            "minimum_deployment_target": deployment}


UPSTREAM = {"executorch": (upstream_executorch, "model.pte"), "tflite": (upstream_tflite, "model.tflite"),
            "onnx": (upstream_onnx, "model.onnx"), "coreml": (upstream_coreml, "model.mlpackage")}


def run_upstream(case: Case, target: str, precision: str, out: Path) -> dict[str, Any]:
    flow, filename = UPSTREAM[target]
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    t0 = time.perf_counter()
    try:
        with captured(case.log):
            extra = flow(case, precision, path)
    except NotApplicable as e:
        return {"status": "n/a", "reason": str(e)}
    except Exception as e:
        with open(case.log, "a") as f:
            f.write(f"\nupstream {case.name} {target} {precision} failed:\n{traceback.format_exc()}\n")
        return {"status": "failed", "error": _first_line(e)}
    seconds = time.perf_counter() - t0
    if "quantize_s" in extra:   # float conversion (cached per model) + quantization; not the PT2E attempt
        seconds = extra["float_s"] + extra["quantize_s"]
    return {"status": "ok", "path": str(path), "mb": _mb(path), "export_s": round(seconds, 3), **extra}


# ------------------------------------------------------------------------------------------------ host runtimes

def load_runner(target: str, path: str, threads: int) -> Runner | str:
    """The artifact in its host runtime with `threads` threads, or why it cannot run here."""
    if target == "executorch":
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)
        program = Runtime.get().load_program(path)
        method = program.load_method("forward")
        return lambda x, _keep=program: method.execute([torch.from_numpy(x)])[0].numpy()
    if target == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=path, num_threads=threads)
        interp.allocate_tensors()
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

        def run(x: np.ndarray) -> np.ndarray:
            interp.set_tensor(inp["index"], _quantize_io(x, inp))
            interp.invoke()
            return _dequantize_io(interp.get_tensor(out["index"]), out)

        return run
    if target == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    return "n/a (needs macOS)"


def _quantize_io(x: np.ndarray, d: dict) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.kind not in "iu":
        return x.astype(dtype, copy=False)
    scale, zero = d["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize_io(y: np.ndarray, d: dict) -> np.ndarray:
    if np.dtype(d["dtype"]).kind not in "iu":
        return y.copy()
    scale, zero = d["quantization"]
    return (y.astype(np.float32) - zero) * scale


def load_all(target: str, recs: list[dict[str, Any]], threads: int, log: Path) -> list[Runner | None]:
    """A runner per record that has an artifact; the reason goes into the record's latency otherwise."""
    runners: list[Runner | None] = []
    for rec in recs:
        runner: Runner | str | None = None
        if rec.get("path"):
            try:
                with captured(log):
                    runner = load_runner(target, rec["path"], threads)
            except Exception as e:
                runner = f"load failed: {_first_line(e)}"
        if isinstance(runner, str):
            rec["latency"] = runner
            runner = None
        runners.append(runner)
    return runners


def measure(runners: list[Runner | None], x: np.ndarray, runs: int) -> list[dict[str, float] | None]:
    """Warm each up, then alternate blocks of BLOCK timed runs between them until each has `runs`."""
    live = [r for r in runners if r is not None]
    for r in live:
        for _ in range(WARMUP):
            r(x)
    times: dict[int, list[float]] = {id(r): [] for r in live}
    while any(len(t) < runs for t in times.values()):
        for r in live:
            t = times[id(r)]
            for _ in range(min(BLOCK, runs - len(t))):
                t0 = time.perf_counter()
                r(x)
                t.append((time.perf_counter() - t0) * 1e3)
    return [None if r is None else {"median_ms": round(statistics.median(times[id(r)]), 4),
                                    "p90_ms": round(float(np.percentile(times[id(r)], 90)), 4)}
            for r in runners]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def top1(runner: Runner, case: Case) -> float | None:
    if case.eval is None:
        return None
    x, labels = case.eval
    preds = [int(np.argmax(runner(np.ascontiguousarray(x[i:i + 1])))) for i in range(x.shape[0])]
    return float(np.mean(np.asarray(preds) == labels))


# ------------------------------------------------------------------------------------------------ one row

def run_row(case: Case, target: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    base = args.workdir / case.name / f"{target}-{precision}"
    effai_rec = run_effai(case, target, precision, base / "effai", args)
    up = run_upstream(case, target, precision, base / "upstream")
    recs = [effai_rec, up]
    pt2e = up.get("litert_torch_pt2e")
    if pt2e and pt2e.get("status") == "ok":
        recs.append(pt2e)   # litert-torch's own int8 .tflite, when it converts, is timed alongside
    runners = load_all(target, recs, args.threads, case.log)
    for rec, runner, lat in zip(recs, runners, measure(runners, case.x, args.runs)):
        if runner is None:
            continue
        rec["latency"] = lat
        rec["cosine"] = round(cosine(runner(case.x), case.reference), 6)
        if rec is not effai_rec:   # effai's own top-1 is the manifest's (same artifact, same runtime)
            rec["top1"] = top1(runner, case)
    return {"model": case.name, "target": target, "precision": precision, "effai": effai_rec, "upstream": up,
            "ratios": ratios(effai_rec, up)}


def ratios(e: dict[str, Any], u: dict[str, Any]) -> dict[str, float | None]:
    def r(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None

    lat = lambda rec: rec["latency"]["median_ms"] if isinstance(rec.get("latency"), dict) else None  # noqa: E731
    return {"latency": r(lat(e), lat(u)), "size": r(e.get("mb"), u.get("mb")),
            "export_time": r(e.get("export_s"), u.get("export_s")),
            "export_time_build_only": r(e.get("build_s"), u.get("export_s"))}


# ------------------------------------------------------------------------------------------------ reporting

def machine(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    v = toolchain.versions()
    keys = ("torch", "executorch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "onnxruntime", "coremltools")
    return {"cpu": cpu, "cores": cores, "threads": threads, "platform": v.get("platform"),
            "versions": {k: v.get(k) for k in ("effai", *keys)}}


def machine_line(m: dict[str, Any]) -> str:
    vs = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return f"{m['cpu']}, {m['cores']} cores usable, {m['threads']} runtime threads; {vs}"


def et_vs_tflite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """effai ExecuTorch / effai TFLite median latency per model, fp32 vs fp32 and int8 vs int8."""
    lat = {(r["model"], r["target"], r["precision"]): r["effai"].get("latency") for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for p in ("fp32", "int8"):
            et, tfl = lat.get((model, "executorch", p)), lat.get((model, "tflite", p))
            if isinstance(et, dict) and isinstance(tfl, dict):
                out.append({"model": model, "precision": p, "executorch_ms": et["median_ms"],
                            "tflite_ms": tfl["median_ms"], "ratio": round(et["median_ms"] / tfl["median_ms"], 3)})
    return out


def print_model(console: Any, case: Case, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    torch_top1 = next((r["effai"]["accuracy"]["torch_top1"] for r in rows if r["effai"].get("accuracy")), None)
    title = f"{case.name}  (input {'x'.join(map(str, case.x.shape))}" + (
        f", torch fp32 top-1 {torch_top1:.1%})" if torch_top1 is not None else ")")
    t = Table(title=title, title_justify="left")
    for col in ("target", "prec", "effai MB", "s", "ms", "parity", "cos", "top-1",
                "upstream MB", "s", "ms", "cos", "top-1", "lat x", "size x", "time x"):
        t.add_column(col, justify="left" if col in ("target", "prec", "parity") else "right")
    for r in rows:
        e, u, q = r["effai"], r["upstream"], r["ratios"]
        acc = e.get("accuracy") or {}
        t.add_row(r["target"], r["precision"],
                  _f(e.get("mb"), ".2f"), _f(e.get("export_s"), ".1f"), _ms(e), _parity(e), _f(e.get("cosine"), ".4f"),
                  _f(acc.get("top1"), ".1%"),
                  _f(u.get("mb"), ".2f") if u["status"] == "ok" else u["status"], _f(u.get("export_s"), ".1f"),
                  _ms(u), _f(u.get("cosine"), ".4f"), _f(u.get("top1"), ".1%"),
                  _f(q["latency"], ".2f"), _f(q["size"], ".2f"), _f(q["export_time"], ".1f"))
    console.print(t)
    for line in notes(rows):
        console.print(f"  {line}", highlight=False, markup=False)


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the table cannot show: errors, n/a reasons, delegation, fallbacks, litert-torch PT2E."""
    out = []
    for r in rows:
        tag, e, u = f"{r['target']} {r['precision']}:", r["effai"], r["upstream"]
        if e.get("error"):
            out.append(f"{tag} effai error: {e['error']}")
        if u["status"] != "ok":
            out.append(f"{tag} upstream {u['status']}: {u.get('error') or u.get('reason')}")
        for who, rec in (("effai", e), ("upstream", u)):
            if isinstance(rec.get("latency"), str):
                out.append(f"{tag} {who} latency: {rec['latency']}")
            if rec.get("delegation"):
                d = rec["delegation"]
                out.append(f"{tag} {who} XNNPACK partitions {d['partitions']}, non-delegated ops "
                           f"{d['non_delegated_ops'] or 'none'}")
        if e.get("fallback"):
            f = e["fallback"]
            out.append(f"{tag} effai fallback {f['status']}: {len(f['float_layers'])} float layer(s) after "
                       f"{f['attempts']} attempt(s) ({f['reason']})")
        if u.get("io_dtype", "float32/float32") != "float32/float32":
            out.append(f"{tag} upstream {u['recipe']} I/O {u['io_dtype']} (effai keeps float32 I/O by default)")
        pt2e = u.get("litert_torch_pt2e")
        if pt2e:
            out.append(f"{tag} litert-torch PT2E int8: " + (
                f"failed: {pt2e['error']}" if pt2e["status"] != "ok" else
                f"{pt2e['mb']:.2f} MB, {_ms(pt2e)} ms, cos {_f(pt2e.get('cosine'), '.4f')}, "
                f"top-1 {_f(pt2e.get('top1'), '.1%')}"))
    return out


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def _ms(rec: dict[str, Any]) -> str:
    lat = rec.get("latency")
    return f"{lat['median_ms']:.2f}" if isinstance(lat, dict) else "-"


def _parity(e: dict[str, Any]) -> str:
    if "parity" not in e:
        return "error"
    s = e["parity"]["status"]
    return s + ("!" if e.get("error") else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _mb(p: Path) -> float:
    """Size of a model file with its external data (ONNX model.onnx.data), or of a package directory."""
    if p.is_dir():
        return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 3)
    files = [f for f in p.parent.iterdir() if f.name == p.name or f.name.startswith(p.name + ".")]
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic rewrite: an interrupted run leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main

def precisions_for(target: str, wanted: str) -> list[str]:
    ps = list(TARGETS.get(target).precisions)
    return ps if wanted == "all" else [p for p in ps if p in wanted.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ghostnetv3_100,mobilenetv2_100,ghostnetv3_050.digits")
    ap.add_argument("--targets", default="executorch,tflite,onnx,coreml")
    ap.add_argument("--precisions", default="all", help="all, or a comma list (fp32,int8,...)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per artifact (after 5 warmup runs)")
    ap.add_argument("--threads", type=int, default=2, help="runtime and torch threads")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration samples, effai and upstream alike")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_matrix.json")
    ap.add_argument("--workdir", type=Path, default=Path("runs/export_matrix"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    info = machine(args.threads)
    console.print(machine_line(info), highlight=False)
    results: dict[str, Any] = {"machine": info, "config": {k: str(v) for k, v in vars(args).items()},
                               "rows": [], "executorch_vs_tflite": []}
    for name in [m for m in args.models.split(",") if m]:
        case = Case(name, args.workdir, args.calib_samples, args.workdir / "toolchain.log")
        rows = []
        for target in [t for t in args.targets.split(",") if t]:
            for precision in precisions_for(target, args.precisions):
                t0 = time.perf_counter()
                row = run_row(case, target, precision, args)
                rows.append(row)
                results["rows"].append(row)
                results["executorch_vs_tflite"] = et_vs_tflite(results["rows"])
                write_json(args.out, results)
                q = row["ratios"]
                console.print(f"{name} {target} {precision}: effai {_ms(row['effai'])} ms, upstream "
                              f"{_ms(row['upstream'])} ms ({row['upstream']['status']}), latency ratio "
                              f"{_f(q['latency'], '.2f')}  [{time.perf_counter() - t0:.0f}s]", highlight=False)
        print_model(console, case, rows)
    for r in results["executorch_vs_tflite"]:
        console.print(f"ExecuTorch/LiteRT {r['model']} {r['precision']}: {r['executorch_ms']:.2f} / "
                      f"{r['tflite_ms']:.2f} ms = {r['ratio']:.2f} (target <= 1.2)", highlight=False)
    console.print(f"results: {args.out}  (toolchain output: {args.workdir / 'toolchain.log'})", highlight=False)


if __name__ == "__main__":
    main()
