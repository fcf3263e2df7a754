"""`effai bench --profile`: per-operator time of an artifact from its runtime's own profiler, on this host.

    prof = profile_artifact(artifact, threads=2, runs=20)   # -> base.Profile (rows, shares, GFLOP/s)

One profiler per format, registered in PROFILERS by the manifest's target: executorch (ETDump + Inspector, XNNPACK's
per-operator events), tflite (operator isolation in ai_edge_litert's Interpreter: the wheel has no op profiler),
onnx (onnxruntime's enable_profiling trace). A format without one (Core ML on Linux, a target with no profiler)
is a UsageError with one line saying why. What each reports: docs/profiling.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from effai.device_bench.profile.base import OpRow, Profile, finish, roofline  # noqa: F401 (re-exported)
from effai.errors import UsageError
from effai.registry import Registry

Profiler = Callable[[Any, int, int, int, int], Profile]   # (artifact, threads, warmup, runs, seed) -> Profile


def _inputs(art: Any, seed: int) -> tuple[list[Any], list[str]]:
    from effai.device_bench import remote_runner

    specs = art.manifest.get("inputs") or []
    return remote_runner.make_inputs(specs, seed), [str(s.get("name")) for s in specs]


def _executorch(art: Any, threads: int, warmup: int, runs: int, seed: int) -> Profile:
    from effai.device_bench.profile import executorch

    return executorch.profile(art.model_file, _inputs(art, seed)[0], threads, warmup, runs)


def _tflite(art: Any, threads: int, warmup: int, runs: int, seed: int) -> Profile:
    from effai.device_bench.profile import tflite

    return tflite.profile(art.model_file, _inputs(art, seed)[0], threads, warmup, runs)


def _onnx(art: Any, threads: int, warmup: int, runs: int, seed: int) -> Profile:
    from effai.device_bench.profile import onnx

    inputs, names = _inputs(art, seed)
    return onnx.profile(art.model_file, inputs, names, threads, warmup, runs)


def _coreml(art: Any, threads: int, warmup: int, runs: int, seed: int) -> Profile:
    if sys.platform != "darwin":
        raise UsageError(f"{art.dir}: Core ML cannot be profiled on {sys.platform} (its runtime exists only on "
                         "macOS); profile it on a Mac with Xcode Instruments' Core ML template")
    raise UsageError(f"{art.dir}: effai has no Core ML per-operator profiler; use Xcode's Core ML performance "
                     "report (Instruments) on this Mac")


PROFILERS: Registry[Profiler] = Registry("profiler")
PROFILERS.register("executorch", _executorch)
PROFILERS.register("tflite", _tflite)
PROFILERS.register("onnx", _onnx)
PROFILERS.register("coreml", _coreml)


def check(target: str, where: str = "") -> None:
    """UsageError before any timing when `target` cannot be profiled here (Core ML off macOS, unknown)."""
    if target == "coreml" and sys.platform != "darwin":
        raise UsageError(f"{where or 'a Core ML artifact'}: --profile cannot profile Core ML on {sys.platform} (its "
                         "runtime exists only on macOS); drop --profile or run on a Mac")
    if target not in PROFILERS:
        raise UsageError(f"{where}: --profile has no profiler for target '{target}' (it profiles "
                         f"{', '.join(t for t in PROFILERS if t != 'coreml')})")


def profile_artifact(art: Any, threads: int = 1, runs: int = 20, warmup: int = 5, seed: int = 0,
                     measured_ms: float | None = None, peak: dict[str, Any] | None = None) -> Profile:
    """The artifact's per-operator profile at `threads`, finished (shares, GFLOP/s) with its roofline summary
    against `peak` (peak.peak_gflops) and `measured_ms` (bench's median, else the profile's own total)."""
    from dataclasses import replace

    from effai.export.quiet import runtime_quiet

    check(art.target, str(getattr(art, "source", None) or art.dir))
    with runtime_quiet():
        prof = finish(PROFILERS.get(art.target)(art, int(threads), int(warmup), int(runs), int(seed)))
    if measured_ms and prof.total_ms > 1.3 * measured_ms:
        prof = replace(prof, notes=prof.notes + (
            f"the rows sum to {prof.total_ms:.3f} ms against a bench median of {measured_ms:.3f} ms: the profiler's own "
            "cost per operator (or a busy host) inflates them; read the shares, and the roofline's bench time",))
    return replace(prof, roofline=roofline(prof, measured_ms, peak))


def flops_from(path: Path | str) -> float | None:
    """FLOPs of a model counted from a sibling .tflite/.onnx artifact (for a .pte, whose XNNPACK events carry no
    shapes): the same model exported to another format has the same convolutions."""
    p = Path(path)
    f = p / "model.tflite" if p.is_dir() else p
    if f.suffix == ".tflite" and f.is_file():
        from effai.device_bench.profile import tflite

        return tflite.model_flops(f)
    return None
