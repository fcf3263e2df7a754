"""Load artifacts in their runtimes and time them (effai and upstream alternating in blocks)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from effai.export.quiet import captured
from matrix.case import Case, _first_line

WARMUP = 5
BLOCK = 10          # timed runs per turn when effai and upstream alternate
Runner = Callable[[np.ndarray], np.ndarray]   # fixed input -> first output


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

