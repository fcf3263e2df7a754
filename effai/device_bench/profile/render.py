"""A profile as a rich table (top operators by time, share, GFLOP/s, fraction of peak), a roofline line, and a
PNG (top operators as bars, time by operator kind), written atomically (temp path, os.replace)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from effai.device_bench.profile.base import Profile
from effai.files import atomic_write


def _f(v: Any, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def table(prof: Profile, label: str, top: int = 15, width: int | None = None) -> Any:
    from rich.table import Table

    peak = (prof.roofline or {}).get("peak_gflops")
    t = Table(title=f"{label}: top {min(top, len(prof.rows))} of {len(prof.rows)} operators, {prof.runtime}, "
                    f"threads={prof.threads}", width=width)
    t.add_column("operator", overflow="fold")
    t.add_column("kind", overflow="fold")
    t.add_column("module", overflow="fold")
    t.add_column("ms", justify="right")
    t.add_column("share", justify="right")
    t.add_column("GFLOP/s", justify="right")
    t.add_column("of peak", justify="right")
    for r in prof.top(top):
        t.add_row(r.name, r.kind, r.module or "-", f"{r.time_ms:.4f}", f"{r.share:.1%}", _f(r.gflops, ".1f"),
                  _f(r.gflops / peak if (r.gflops and peak) else None, ".1%"))
    return t


def roofline_line(prof: Profile) -> str:
    r = prof.roofline or {}
    parts = [f"FLOPs {_f(r.get('gflop'), '.3f', '?')} G", f"weights {(r.get('weight_bytes') or 0) / 1e6:.2f} MB",
             f"time {_f(r.get('measured_ms'), '.3f', '?')} ms ({r.get('time_source', '?')})"]
    if r.get("achieved_gflops"):
        parts.append(f"{r['achieved_gflops']:.1f} GFLOP/s")
    if r.get("peak_gflops"):
        parts.append(f"peak {r['peak_gflops']:.1f} GFLOP/s")
    if r.get("fraction_of_peak"):
        parts.append(f"{r['fraction_of_peak']:.1%} of peak, {r['x_from_limit']:.1f}x the compute limit "
                     f"({r['compute_limit_ms']:.3f} ms)")
    return "roofline: " + ", ".join(parts)


def by_kind(prof: Profile) -> list[tuple[str, float]]:
    out: dict[str, float] = {}
    for r in prof.rows:
        out[r.kind] = out.get(r.kind, 0.0) + r.time_ms
    return sorted(out.items(), key=lambda kv: -kv[1])


def plot(profiles: list[tuple[str, Profile]], path: Path | str, top: int = 15) -> Path:
    """One row of two panels per profile: top operators (ms) and time by operator kind."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    path = Path(path)
    n = max(1, len(profiles))
    fig = Figure(figsize=(14, 4.2 * n))
    for i, (label, prof) in enumerate(profiles):
        ax1 = fig.add_subplot(n, 2, 2 * i + 1)
        rows = prof.top(top)[::-1]
        ax1.barh([(f"{r.module} {r.kind}" if r.module else r.name)[:48] for r in rows], [r.time_ms for r in rows], color="#4477aa")
        ax1.set_xlabel("ms per inference")
        ax1.set_title(f"{label[:60]}: top operators", fontsize=9)
        ax1.tick_params(axis="y", labelsize=7)
        ax2 = fig.add_subplot(n, 2, 2 * i + 2)
        kinds = by_kind(prof)[:12][::-1]
        ax2.barh([k[:40] for k, _ in kinds], [v for _, v in kinds], color="#ee6677")
        ax2.set_xlabel("ms per inference")
        ax2.set_title(f"by kind ({prof.total_ms:.3f} ms total, {prof.runtime})", fontsize=9)
        ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(path, buf.getvalue())
    return path
