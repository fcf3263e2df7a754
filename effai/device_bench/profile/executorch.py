"""ExecuTorch per-operator profile from ETDump: the program is loaded with ETDump enabled
(portable_lib._load_for_executorch(..., enable_etdump=True)), run, the dump written and read back with
executorch.devtools.Inspector. Its "Execute" block holds one event per instruction run outside a delegate (a
portable kernel: its op name) and, from XNNPACK's own profiler, one event per XNNPACK operator inside the delegate
("Convolution (NHWC, F32) IGEMM #3"). Each row is the event's median over the profiled runs.

The rows add up to Method::execute: the XNNPACK operators, the portable kernels, and two remainder rows, "XNNPACK
delegate (outside its operators)" and "ExecuTorch runtime (between instructions)". XNNPACK's operator timings are
consecutive differences from the invoke's start to each operator's end, so they tile xnn_invoke_runtime exactly;
the delegate remainder (DELEGATE_CALL minus them) is what the backend does around the invoke on every call:
xnn_reshape_external_value + xnn_reshape_runtime (XNNExecutor::prepare_args), xnn_setup_runtime_v2, and the
output resize (docs/profiling.md). Module names: a .pte keeps no debug handles to module paths unless an ETRecord was
written at export (effai does not write one), so ExecuTorch rows carry the XNNPACK operator names only.
FLOPs: the XNNPACK events carry no shapes, so per-row GFLOP/s is not computed; the model's FLOPs come from the
artifact's sibling export when given (roofline only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from effai.device_bench.profile.base import OpRow, Profile, median
from effai.errors import UsageError

DELEGATE_REST = "XNNPACK delegate (outside its operators)"
RUNTIME_REST = "ExecuTorch runtime (between instructions)"


def _kind(name: str) -> str:
    """"Convolution (NHWC, F32) IGEMM #3" -> "Convolution (NHWC, F32) IGEMM"."""
    head, sep, tail = name.rpartition(" #")
    return head if sep and tail.isdigit() else name


def profile(model_file: Path, inputs: list[np.ndarray], threads: int, warmup: int, runs: int) -> Profile:
    try:
        import torch
        from executorch.devtools import Inspector
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        raise UsageError("profiling a .pte needs executorch with its devtools (ETDump, Inspector); "
                         "pip install executorch") from None
    try:
        portable_lib._unsafe_reset_threadpool(int(threads))
    except AttributeError:
        pass
    module = portable_lib._load_for_executorch(str(model_file), enable_etdump=True, debug_buffer_size=0)
    args = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)
    for _ in range(max(1, warmup)):
        module.forward(args)
    # ETDump keeps every run since load: a fresh module for the profiled runs, so warmup is not in the medians
    module = portable_lib._load_for_executorch(str(model_file), enable_etdump=True, debug_buffer_size=0)
    module.forward(args)          # the first run (allocation, XNNPACK weight packing) is dropped below
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        module.forward(args)
        walls.append((time.perf_counter() - t0) * 1e3)
    tmp = tempfile.mkdtemp(prefix="effai-etdump-")
    try:
        path = os.path.join(tmp, "profile.etdp")
        module.write_etdump_result_to_file(path)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            inspector = Inspector(etdump_path=path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    blocks = [b for b in inspector.event_blocks if b.name == "Execute"]
    if not blocks:
        raise UsageError(f"{model_file}: the ETDump holds no Execute events; this executorch build may lack "
                         "ETDump support (pip install executorch from PyPI has it)")

    def per_run(e: object) -> float:
        raw = list(getattr(getattr(e, "perf_data", None), "raw", None) or [])
        return median(raw[1:] if len(raw) > 1 else raw)   # drop the first (warm-up) run

    rows: list[OpRow] = []
    execute = delegate_calls = inside = outside = 0.0
    for ev in blocks[0].events:
        t = per_run(ev)
        if ev.name == "Method::execute":
            execute += t
        elif ev.name == "DELEGATE_CALL":
            delegate_calls += t
        elif ev.is_delegated_op:
            inside += t
            rows.append(OpRow(name=ev.name, kind=_kind(ev.name), time_ms=t, delegated=True))
        else:
            outside += t
            rows.append(OpRow(name=ev.name, kind=ev.name.removeprefix("native_call_"), time_ms=t, delegated=False))
    notes = []
    if delegate_calls and delegate_calls > inside:
        rows.append(OpRow(name=DELEGATE_REST, kind="delegate", time_ms=delegate_calls - inside, delegated=True))
    if execute and execute > delegate_calls + outside:
        rows.append(OpRow(name=RUNTIME_REST, kind="runtime", time_ms=execute - delegate_calls - outside,
                          delegated=False))
    if not any(r.kind not in ("delegate", "runtime") and r.delegated for r in rows) and delegate_calls:
        notes.append("this executorch build records no per-operator events inside XNNPACK (built without "
                     "EXECUTORCH_XNNPACK_ENABLE_PROFILING): the delegate is one row")
    portable = [r for r in rows if r.delegated is False and r.kind != "runtime"]
    if portable:
        notes.append(f"{len(portable)} instruction(s) run as portable kernels outside XNNPACK, "
                     f"{sum(r.time_ms for r in portable):.3f} ms per inference: "
                     + ", ".join(sorted({r.kind for r in portable}))[:200])
    notes.append("module names: a .pte keeps no module paths without an ETRecord from export; rows are XNNPACK "
                 "operators and portable kernels")
    try:
        from importlib import metadata

        version = metadata.version("executorch")
    except Exception:
        version = "?"
    return Profile(target="executorch", runtime=f"executorch {version} (XNNPACK)",
                   method="ETDump (enable_etdump) read by executorch.devtools.Inspector: portable-kernel events and "
                          "XNNPACK's per-operator events, median over the profiled runs",
                   threads=threads, runs=runs, total_ms=0.0, rows=tuple(rows), wall_ms=median(walls),
                   weight_bytes=Path(model_file).stat().st_size, notes=tuple(notes))
