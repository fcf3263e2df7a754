"""Time one effai artifact in this Python process and report every measurement as JSON lines.

Standalone on purpose: stdlib + numpy at import time, nothing from effai, Python 3.8 syntax, so the ssh runner can
copy it alone to a board. `python remote_runner.py ARTIFACT_DIR --threads N --warmup W --runs R` prints hello, load,
first, start, iter (one per timed iteration), end or error events; `measure()` is the same measurement in-process
(the host runner). Protocol and exit codes: docs/bench.md, "effai/device_bench/remote_runner.py".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

EXIT_OK, EXIT_OTHER, EXIT_BAD_ARTIFACT, EXIT_MISSING_RUNTIME = 0, 1, 2, 3

# Distribution name -> the key it is reported under in the hello event.
RUNTIME_PACKAGES = ("executorch", "ai-edge-litert", "tflite-runtime", "onnxruntime", "onnxruntime-gpu", "coremltools")

_INSTALL = {
    "executorch": "pip install executorch",
    "tflite": "pip install ai-edge-litert (or tflite-runtime on boards where that is what is packaged)",
    "onnx": "pip install onnxruntime",
    "coreml": "pip install coremltools (on macOS)",
}


class MeasureError(Exception):
    """A failure with a kind from the protocol and a one-line message that says what to do."""

    exit_codes = {"missing-runtime": EXIT_MISSING_RUNTIME, "bad-artifact": EXIT_BAD_ARTIFACT, "load": EXIT_OTHER,
                  "run": EXIT_OTHER}

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.partial: List[float] = []   # timed samples (ms) measured before a run error

    @property
    def exit_code(self) -> int:
        return self.exit_codes.get(self.kind, EXIT_OTHER)


def installed_runtimes() -> Dict[str, str]:
    """Versions of the inference runtimes installed for this Python, read from package metadata (no imports)."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return {}
    found = {}
    for name in RUNTIME_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except Exception:
            continue
    return found


def hello() -> Dict[str, Any]:
    """What this Python and machine are: the first event of every run."""
    return {"event": "hello", "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "executable": sys.executable, "cpus": os.cpu_count(),
            "runtimes": installed_runtimes()}


def read_manifest(artifact_dir: str) -> Dict[str, Any]:
    path = os.path.join(artifact_dir, "manifest.json")
    if not os.path.isdir(artifact_dir):
        raise MeasureError("bad-artifact", "artifact directory not found: %s; pass a directory written by effai "
                           "export" % artifact_dir)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise MeasureError("bad-artifact", "%s has no manifest.json; pass a directory written by effai export"
                           % artifact_dir) from None
    except (OSError, ValueError) as e:
        raise MeasureError("bad-artifact", "%s cannot be read (%s); re-export the artifact" % (path, e)) from None
    if not isinstance(m, dict) or not all(k in m for k in ("target", "model_file", "inputs")):
        raise MeasureError("bad-artifact", "%s lacks target, model_file or inputs; re-export the artifact" % path)
    if not os.path.exists(os.path.join(artifact_dir, m["model_file"])):
        raise MeasureError("bad-artifact", "%s: the model file %s is missing; re-export the artifact"
                           % (artifact_dir, m["model_file"]))
    return m


_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
           "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def make_inputs(specs: List[Dict[str, Any]], seed: int) -> List[np.ndarray]:
    """Seeded random inputs of the declared shapes and dtypes. Integer inputs with `quantization` get standard
    normal values quantized with the declared scale / zero point (what a real int8-I/O app feeds); other integers
    get small non-negative values."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        name = str(spec.get("dtype", "float32"))
        if name not in _DTYPES:
            raise MeasureError("bad-artifact", "input %s has dtype %s, which effai cannot generate; re-export the "
                               "artifact" % (spec.get("name"), name))
        dtype = np.dtype(_DTYPES[name])
        shape = tuple(int(d) for d in spec["shape"])
        if dtype.kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            q = spec.get("quantization")
            if q:
                x = rng.standard_normal(shape) / float(q["scale"]) + float(q["zero_point"])
                arr = np.clip(np.round(x), info.min, info.max).astype(dtype)
            else:
                arr = rng.integers(0, min(int(info.max), 10) + 1, shape).astype(dtype)
        arrays.append(np.ascontiguousarray(arr))
    return arrays


def _version(dist: str) -> str:
    return installed_runtimes().get(dist, "unknown")


def _missing(target: str, what: str) -> MeasureError:
    return MeasureError("missing-runtime", "%s is not installed for %s (%s); install it: %s"
                        % (what, sys.executable, platform.python_version(), _INSTALL[target]))


def load_executorch(path: str, inputs: List[np.ndarray], threads: int) -> Tuple[Callable[[], Any], str, str]:
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise _missing("executorch", "the ExecuTorch runtime (executorch.runtime)") from None
    try:  # XNNPACK's thread pool is process-wide; this resets it to `threads` workers
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        _unsafe_reset_threadpool(int(threads))
    except ImportError:
        pass
    import torch  # ExecuTorch's Python API takes torch tensors; only this branch needs torch

    method = Runtime.get().load_program(path).load_method("forward")
    args = [torch.from_numpy(x) for x in inputs]
    execute = method.execute

    def invoke() -> Any:
        return execute(args)

    return invoke, "executorch", _version("executorch")


def load_tflite(path: str, inputs: List[np.ndarray], threads: int) -> Tuple[Callable[[], Any], str, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter
        runtime, dist = "litert", "ai-edge-litert"
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
            runtime, dist = "tflite_runtime", "tflite-runtime"
        except ImportError:
            raise _missing("tflite", "a TFLite runtime (ai_edge_litert or tflite_runtime)") from None
    interp = Interpreter(model_path=path, num_threads=int(threads))
    interp.allocate_tensors()
    details = interp.get_input_details()
    if len(details) != len(inputs):
        raise MeasureError("bad-artifact", "%s has %d inputs but the manifest declares %d; re-export the artifact"
                           % (path, len(details), len(inputs)))
    resize = [(d, x) for d, x in zip(details, inputs) if tuple(d["shape"]) != x.shape and _resizable(d, x.shape)]
    if resize:   # --input-shape on a plain file: the dims the model marks -1 take the asked sizes
        for d, x in resize:
            interp.resize_tensor_input(d["index"], list(x.shape), strict=True)
        interp.allocate_tensors()
        details = interp.get_input_details()
    for d, x in zip(details, inputs):
        if tuple(d["shape"]) != x.shape or np.dtype(d["dtype"]) != x.dtype:
            raise MeasureError("bad-artifact", "%s input %s is %s %s, the manifest says %s %s; re-export the "
                               "artifact" % (path, d["name"], list(d["shape"]), np.dtype(d["dtype"]).name,
                                             list(x.shape), x.dtype.name))
        interp.set_tensor(d["index"], x)
    return interp.invoke, runtime, _version(dist)


def _resizable(detail: Any, shape: Tuple[int, ...]) -> bool:
    """True when a LiteRT input may take `shape`: same rank, and only the dims its shape_signature marks -1 differ."""
    sig = [int(d) for d in detail.get("shape_signature", [])]
    return len(sig) == len(shape) and all(d == -1 or d == s for d, s in zip(sig, shape))


def load_onnx(path: str, inputs: List[np.ndarray], threads: int,
              names: List[str]) -> Tuple[Callable[[], Any], str, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise _missing("onnx", "onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    declared = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names if set(names) == set(declared) else declared, inputs))
    run = sess.run

    def invoke() -> Any:
        return run(None, feeds)

    return invoke, "onnxruntime", getattr(ort, "__version__", _version("onnxruntime"))


def load_coreml(path: str, inputs: List[np.ndarray], threads: int,
                names: List[str]) -> Tuple[Callable[[], Any], str, str]:
    if sys.platform != "darwin":
        raise MeasureError("missing-runtime", "Core ML artifacts need macOS (the Core ML runtime exists only there); "
                           "run effai bench on a Mac for %s" % path)
    try:
        import coremltools as ct
    except ImportError:
        raise _missing("coreml", "coremltools") from None
    model = ct.models.MLModel(path, compute_units=ct.ComputeUnit.CPU_ONLY)
    feeds = dict(zip(names, inputs))
    predict = model.predict

    def invoke() -> Any:
        return predict(feeds)

    return invoke, "coreml", _version("coremltools")


def import_runtime(target: str) -> None:
    """Import the target's runtime before load time is measured, so `load` is the model's load, not Python importing
    the runtime (ExecuTorch's pulls in torch: seconds). A missing runtime is reported by the load_* function."""
    modules = {"executorch": ("executorch.runtime", "torch"), "tflite": ("ai_edge_litert.interpreter",),
               "onnx": ("onnxruntime",), "coreml": ("coremltools",) if sys.platform == "darwin" else ()}
    for name in modules.get(target, ()):
        try:
            __import__(name)
        except ImportError:
            if name == "ai_edge_litert.interpreter":
                try:
                    __import__("tflite_runtime.interpreter")
                except ImportError:
                    pass


def load(manifest: Dict[str, Any], artifact_dir: str, threads: int,
         inputs: List[np.ndarray]) -> Tuple[Callable[[], Any], str, str]:
    """(invoke, runtime name, runtime version) for the artifact's target."""
    target = manifest["target"]
    path = os.path.join(artifact_dir, manifest["model_file"])
    names = [str(i.get("name")) for i in manifest["inputs"]]
    if target == "executorch":
        return load_executorch(path, inputs, threads)
    if target == "tflite":
        return load_tflite(path, inputs, threads)
    if target == "onnx":
        return load_onnx(path, inputs, threads, names)
    if target == "coreml":
        return load_coreml(path, inputs, threads, names)
    raise MeasureError("bad-artifact", "%s: unknown target %r in manifest.json (effai benchmarks executorch, tflite, "
                       "onnx, coreml); re-export the artifact" % (artifact_dir, target))


def timed_loop(invoke: Callable[[], Any], runs: int, min_seconds: Optional[float],
               samples: Optional[List[int]] = None,
               on_sample: Optional[Callable[[int, int], None]] = None) -> List[int]:
    """Nanoseconds of each invoke appended to `samples` in order: exactly `runs`, or at least `runs` and until
    `min_seconds` passed. Passing the list in keeps what was measured when an invoke raises. `on_sample(i, ns)`,
    when given, is called after each timed invoke, outside the timed span (streaming to a remote host)."""
    pc = time.perf_counter_ns
    samples = [] if samples is None else samples
    append = samples.append
    if on_sample is not None:
        deadline = pc() + int((min_seconds or 0) * 1e9)
        n = 0
        while n < runs or (min_seconds is not None and pc() < deadline):
            t0 = pc()
            invoke()
            dt = pc() - t0
            append(dt)
            on_sample(n, dt)
            n += 1
        return samples
    if min_seconds is None:
        for _ in range(runs):
            t0 = pc()
            invoke()
            append(pc() - t0)
        return samples
    deadline = pc() + int(min_seconds * 1e9)
    n = 0
    while True:
        t0 = pc()
        invoke()
        t1 = pc()
        append(t1 - t0)
        n += 1
        if n >= runs and t1 >= deadline:
            return samples


def measure(artifact_dir: Any, threads: int, warmup: int, runs: int, min_seconds: Optional[float] = None,
            seed: int = 0, emit: Optional[Callable[[Dict[str, Any]], None]] = None,
            stream: bool = False) -> Dict[str, Any]:
    """Load, run once (first), warm up, time; call `emit` with each protocol event and return the totals.

    With `stream`, each `iter` event is emitted as soon as its invoke ends (outside the timed span), so a remote
    host that loses the connection mid-loop still has every sample sent so far; otherwise they follow the loop.

    Raises MeasureError (after emitting its `error` event) for a missing runtime, a bad artifact, or a failure
    loading or running the model; the samples timed before a run error are in its `.partial` (and emitted as
    `iter` events before the `error` event)."""
    emit = emit or (lambda event: None)
    artifact_dir = str(artifact_dir)
    if threads < 1 or warmup < 0 or runs < 1 or (min_seconds is not None and min_seconds < 0):
        err = MeasureError("run", "bad settings threads=%s warmup=%s runs=%s min_seconds=%s; threads and runs must be "
                           ">= 1, warmup and min_seconds >= 0" % (threads, warmup, runs, min_seconds))
        emit({"event": "error", "kind": err.kind, "message": err.message})
        raise err
    stage = "load"
    samples: List[int] = []
    try:
        manifest = read_manifest(artifact_dir)
        inputs = make_inputs(manifest["inputs"], seed)
        t0 = time.perf_counter_ns()
        import_runtime(str(manifest["target"]))
        t1 = time.perf_counter_ns()
        invoke, runtime, version = load(manifest, artifact_dir, threads, inputs)
        load_ms = (time.perf_counter_ns() - t1) / 1e6
        import_ms = (t1 - t0) / 1e6
        emit({"event": "load", "ms": load_ms, "runtime": runtime, "runtime_version": version, "import_ms": import_ms})
        stage = "run"
        t0 = time.perf_counter_ns()
        invoke()
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        emit({"event": "first", "ms": first_ms})
        for _ in range(warmup):
            invoke()
        start = time.time()
        emit({"event": "start", "t": start})
        on_sample = (lambda i, ns: emit({"event": "iter", "i": i, "ms": ns / 1e6})) if stream else None
        timed_loop(invoke, runs, min_seconds, samples, on_sample)
        end = time.time()
    except MeasureError as e:
        emit({"event": "error", "kind": e.kind, "message": e.message})
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:
        detail = " ".join(("%s: %s" % (type(e).__name__, e)).split())[:400]
        fix = ("re-export the artifact or check the runtime version" if stage == "load"
               else "check the input shapes in manifest.json and the runtime version")
        err = MeasureError(stage, "%s the model failed: %s; %s" % ("loading" if stage == "load" else "running",
                                                                    detail, fix))
        err.partial = [ns / 1e6 for ns in samples]
        for i, ms in enumerate(err.partial):
            if not stream:
                emit({"event": "iter", "i": i, "ms": ms})
        emit({"event": "error", "kind": err.kind, "message": err.message})
        raise err from e
    samples_ms = [ns / 1e6 for ns in samples]
    for i, ms in enumerate(samples_ms if not stream else ()):
        emit({"event": "iter", "i": i, "ms": ms})
    emit({"event": "end", "t": end})
    return {"runtime": runtime, "runtime_version": version, "threads": threads, "warmup": warmup, "load_ms": load_ms,
            "import_ms": import_ms,
            "first_ms": first_ms, "samples_ms": samples_ms, "window_s": (start, end)}


def _printer(stream: Any) -> Callable[[Dict[str, Any]], None]:
    def emit(event: Dict[str, Any]) -> None:
        stream.write(json.dumps(event, separators=(",", ":")) + "\n")
        stream.flush()

    return emit


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Time one effai artifact; JSON lines on stdout.")
    p.add_argument("artifact_dir")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--min-seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the iter events after the timed loop instead of one by one as it runs")
    args = p.parse_args(argv)
    emit = _printer(sys.stdout)
    emit(hello())
    try:
        measure(args.artifact_dir, args.threads, args.warmup, args.runs, args.min_seconds, args.seed, emit,
                args.stream)
    except MeasureError as e:
        return e.exit_code
    except KeyboardInterrupt:
        emit({"event": "error", "kind": "run", "message": "interrupted (Ctrl-C or the connection closed)"})
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
