"""What a per-operator profile holds, whatever runtime measured it: one OpRow per operator (or delegate node), the
totals, and the roofline summary (FLOPs, weight bytes, measured time, fraction of the host's measured peak).

Each format's profiler (executorch.py, tflite.py, onnx.py) fills `rows` with per-call times (ms, median over the
profiled runs) from its runtime's own profiler; `finish` computes the shares and the achieved GFLOP/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class OpRow:
    """One operator (node, delegate node) of the profiled run."""

    name: str                       # the runtime's name for it (node name, XNNPACK operator, tflite op + index)
    kind: str                       # operator type: Conv, CONV_2D, Convolution (NHWC, F32) IGEMM, ...
    time_ms: float                  # median per inference over the profiled runs
    module: str = ""                # torch module it came from, where the artifact says so ("" when unknown)
    flops: float | None = None      # 2 x multiply-accumulates (conv, matmul, linear); None when not computed
    share: float = 0.0              # time_ms / the profile's total
    gflops: float | None = None     # achieved: flops / time
    delegated: bool | None = None   # ExecuTorch: inside the XNNPACK delegate (True) or a portable kernel (False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """A per-operator profile of one artifact at one thread count."""

    target: str
    runtime: str
    method: str                     # how the times were taken, in one sentence (docs/profiling.md says more)
    threads: int
    runs: int
    total_ms: float                 # what the shares are shares of (the rows sum to it)
    rows: tuple[OpRow, ...]
    wall_ms: float | None = None    # median wall time of the profiled runs (profiling overhead included)
    flops: float | None = None      # the whole model's FLOPs (2 x MACs) where computable
    weight_bytes: int | None = None
    notes: tuple[str, ...] = ()
    mapped: int = 0                 # rows with a torch module name
    roofline: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        d["notes"] = list(self.notes)
        return d

    def top(self, n: int = 15) -> list[OpRow]:
        return sorted(self.rows, key=lambda r: -r.time_ms)[:n]


def finish(profile: Profile) -> Profile:
    """Shares of the total and achieved GFLOP/s per row; rows sorted by run order as given."""
    total = sum(r.time_ms for r in profile.rows)
    rows = tuple(replace(r, share=(r.time_ms / total) if total > 0 else 0.0,
                         gflops=(r.flops / (r.time_ms * 1e6)) if r.flops and r.time_ms > 0 else None)
                 for r in profile.rows)
    flops = profile.flops
    if flops is None:
        counted = [r.flops for r in rows if r.flops]
        flops = float(sum(counted)) if counted else None
    return replace(profile, rows=rows, total_ms=total, flops=flops, mapped=sum(1 for r in rows if r.module))


def roofline(profile: Profile, measured_ms: float | None, peak: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs, weight bytes, measured time (bench's median when given, else the profile's total), achieved GFLOP/s
    and its fraction of the host's measured matmul peak; the time the peak would need is the compute limit."""
    ms = measured_ms if measured_ms and measured_ms > 0 else profile.total_ms
    out: dict[str, Any] = {"flops": profile.flops, "gflop": profile.flops / 1e9 if profile.flops else None,
                           "weight_bytes": profile.weight_bytes, "measured_ms": ms,
                           "time_source": "bench median" if measured_ms else "profile total"}
    if profile.flops and ms:
        out["achieved_gflops"] = profile.flops / (ms * 1e6)
        if profile.weight_bytes:
            out["flops_per_weight_byte"] = profile.flops / profile.weight_bytes
    if peak and peak.get("gflops"):
        out["peak_gflops"] = float(peak["gflops"])
        out["peak_method"] = peak.get("method")
        if out.get("achieved_gflops"):
            out["fraction_of_peak"] = out["achieved_gflops"] / float(peak["gflops"])
            out["compute_limit_ms"] = profile.flops / (float(peak["gflops"]) * 1e6)
            out["x_from_limit"] = ms / out["compute_limit_ms"]
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return 0.0
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def conv_flops(out_numel: int, kernel_elems_per_output: int) -> float:
    """2 x MACs of a convolution: every output element takes kernel_elems_per_output multiply-adds."""
    return 2.0 * out_numel * kernel_elems_per_output
