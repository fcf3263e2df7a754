"""Summary statistics of per-iteration latencies (ms): what every BenchRecord's `stats` holds.

Percentiles use linear interpolation between order statistics (numpy's default), so p50 equals the median. The
trimmed mean drops 10% of the samples on each side (rounded down), which ignores a few scheduler hiccups without
hiding a slow tail the p99 still shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TRIM = 0.10
KEYS = ("n", "median", "p90", "p99", "mean", "std", "min", "max", "trimmed_mean")


def trimmed_mean(samples: Sequence[float], trim: float = TRIM) -> float:
    """Mean after dropping floor(trim * n) samples from each end of the sorted samples."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    k = int(trim * len(x))
    return float(x[k:len(x) - k].mean())


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """n, median, p90, p99, mean, std (population), min, max, trimmed_mean (10% each side); {"n": 0} when empty."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"n": int(x.size), "median": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(x.mean()),
            "std": float(x.std()), "min": float(x.min()), "max": float(x.max()), "trimmed_mean": trimmed_mean(x)}


def from_aggregate(agg: dict[str, float]) -> dict[str, float]:
    """Stats of a run whose tool printed only aggregates (LiteRT benchmark_model: count, min, max, avg, std and, in
    newer builds, p5/median/p95; parsed by runners/tool_output.py). What the tool did not print is NaN, never
    recomputed from one mean: p90/p99 and the trimmed mean need the samples."""
    nan = float("nan")
    get = lambda k: float(agg[k]) if agg.get(k) is not None else nan  # noqa: E731
    return {"n": int(agg.get("count", 0)), "median": get("median_ms"), "p90": nan, "p99": nan, "mean": get("avg_ms"),
            "std": get("std_ms"), "min": get("min_ms"), "max": get("max_ms"), "trimmed_mean": nan}
