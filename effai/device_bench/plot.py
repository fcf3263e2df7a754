"""One PNG per bench report: latency distributions per artifact x device x threads, and energy per inference.

matplotlib is imported inside `plot` (device_bench imports without it) and used through its object API with the
Agg canvas; the PNG is written to a temp path and os.replace-d.
Panels: docs/bench.md, "Plot" and "effai/device_bench/plot.py".
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path

from effai.device_bench.base import BenchRecord
from effai.device_bench.report import artifact_label, shorten
from effai.files import atomic_write

LOG_SCALE_RATIO = 30.0


def _finite(xs: list[float]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _label(rec: BenchRecord) -> str:
    return f"{shorten(artifact_label(rec), 44)}\n@ {shorten(str(rec.device.get('name', '?')), 30)} x{rec.threads}"


def _energy_mj(rec: BenchRecord) -> float | None:
    e = rec.energy or {}
    j = e.get("joules_per_inference")
    if rec.status == "ok" and e.get("available") and isinstance(j, (int, float)) and math.isfinite(j):
        return j * 1e3
    return None


def _energy_note(records: list[BenchRecord], width: int) -> str:
    """'energy unavailable: <reasons>' wrapped to `width` characters, at most 3 lines; parenthesised explanations
    are dropped (the report and the CLI keep the full reasons)."""
    reasons: list[str] = []
    for rec in records:
        r = str((rec.energy or {}).get("reason") or "no meter")
        r = r[len("unavailable:"):].strip() if r.startswith("unavailable:") else r
        r = re.sub(r"\s*\([^()]*\)", "", r)
        if r not in reasons:
            reasons.append(r)
    lines = textwrap.wrap(f"energy unavailable: {'; '.join(reasons)}", width)
    return "\n".join(lines[:2] + ([shorten(lines[2] + " " + " ".join(lines[3:]), width)] if len(lines) > 2 else []))


def plot(records: list[BenchRecord], png: Path | str) -> Path:
    """Draw `records` into `png` (created or replaced atomically) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    png = Path(png)
    records = list(records)
    if not records:
        raise ValueError("no bench records to plot")
    samples = [_finite(r.samples_ms) for r in records]
    energies = [_energy_mj(r) for r in records]
    has_energy = any(e is not None for e in energies)
    n = len(records)

    fig = Figure(figsize=(13 if has_energy else 10, max(3.0, 0.62 * n + 1.8)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if has_energy:
        ax, ax_e = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3.0, 1.3]})
    else:
        ax, ax_e = fig.subplots(1, 1), None
    positions = list(range(1, n + 1))
    drawn = [(p, s) for p, s in zip(positions, samples) if s]
    if drawn:
        ax.boxplot([s for _, s in drawn], positions=[p for p, _ in drawn], orientation="horizontal", widths=0.55,
                   patch_artist=True, showfliers=True, flierprops={"markersize": 2, "alpha": 0.5},
                   boxprops={"facecolor": "#cfe0f3", "edgecolor": "#2b5d8a"},
                   medianprops={"color": "#c0392b", "linewidth": 1.6})
    medians = [_median(s) if s else None for s in samples]
    positive = [m for m in medians if m and m > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        ax.set_xscale("log")
    for pos, rec, s, med in zip(positions, records, samples, medians):
        if med is None:
            why = rec.error or "no samples"
            ax.annotate(shorten(f"{rec.status}: {why}", 70), (0.01, pos), xycoords=("axes fraction", "data"),
                        va="center", fontsize=8, color="#c0392b")
            continue
        ax.annotate(f"{med:.3g} ms (n={len(s)})", (med, pos - 0.3), ha="center", va="bottom", fontsize=8,
                    color="#c0392b")   # just above the box, centred on the median line
    ax.set_yticks(positions, [_label(r) for r in records], fontsize=8)
    ax.set_ylim(n + 0.6, 0.4)   # first record on top, like the table
    ax.set_xlabel("latency per inference (ms), raw samples")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.12)
    ax.set_title("latency (median annotated)", fontsize=10)

    if ax_e is not None:
        vals = [e if e is not None else 0.0 for e in energies]
        ax_e.barh(positions, vals, height=0.55, color=["#7fb77e" if e is not None else "none" for e in energies])
        top = max(v for v in vals) or 1.0
        for pos, rec, e in zip(positions, records, energies):
            if e is None:
                ax_e.annotate("n/a", (0, pos), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                              color="#777777")
                continue
            w = (rec.energy or {}).get("mean_watts")
            text = f"{e:.3g} mJ" + (f", {w:.3g} W" if isinstance(w, (int, float)) and math.isfinite(w) else "")
            ax_e.annotate(text, (e, pos), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax_e.set_xlim(0, top * 1.6)
        ax_e.set_xlabel("energy per inference (mJ), idle subtracted")
        ax_e.grid(axis="x", alpha=0.3)
        ax_e.set_title("energy", fontsize=10)
    else:
        # supxlabel, unlike fig.text, gets room from the constrained layout (never overlaps the axis label)
        fig.supxlabel(_energy_note(records, 150), fontsize=8, color="#555555")
    fig.suptitle("effai bench", fontsize=12)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "effai"})
    atomic_write(png, buf.getvalue())
    return png
