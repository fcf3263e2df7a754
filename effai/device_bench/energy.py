"""Turn a meter's Trace into J/inference and mean W over the timed window, idle baseline subtracted:

    mean_watts           = raw W over the window - idle W
    joules_per_inference = (E_window - idle W * window seconds) / inferences

Fewer than two samples in the window: unavailable. Integration: docs/bench.md, "effai/device_bench/energy.py".
"""

from __future__ import annotations

import bisect

from effai.device_bench.base import EnergyReading, Trace

TOO_SHORT = "timed window shorter than the sampling period; use --min-seconds"


def _interp(times: list[float], values: list[float], t: float) -> float:
    """Linear interpolation of the trace at t, times[0] <= t <= times[-1]."""
    i = bisect.bisect_left(times, t)
    if i < len(times) and times[i] == t:
        return values[i]
    t0, t1, v0, v1 = times[i - 1], times[i], values[i - 1], values[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def integrate(trace: Trace, window: tuple[float, float]) -> tuple[float, float, int]:
    """(joules, seconds covered, samples inside) for the part of `window` the trace covers."""
    times, values = trace.times, trace.values
    a, b = window
    if len(times) < 2 or b <= a:
        return 0.0, 0.0, 0
    lo, hi = max(a, times[0]), min(b, times[-1])
    inside = sum(1 for t in times if a <= t <= b)
    if hi <= lo:
        return 0.0, 0.0, inside
    if trace.kind == "energy":
        return _interp(times, values, hi) - _interp(times, values, lo), hi - lo, inside
    if trace.kind != "power":
        raise ValueError(f"trace kind must be 'power' or 'energy', not {trace.kind!r}")
    ts = [lo] + [t for t in times if lo < t < hi] + [hi]
    vs = [_interp(times, values, lo)] + [v for t, v in zip(times, values) if lo < t < hi] + \
         [_interp(times, values, hi)]
    joules = sum((ts[i + 1] - ts[i]) * (vs[i + 1] + vs[i]) / 2 for i in range(len(ts) - 1))
    return joules, hi - lo, inside


def mean_watts(trace: Trace, window: tuple[float, float]) -> tuple[float | None, int]:
    """(mean W over the covered part of the window or None when < 2 samples inside, samples inside)."""
    joules, covered, inside = integrate(trace, window)
    if inside < 2 or covered <= 0:
        return None, inside
    return joules / covered, inside


def reading(meter_name: str, trace: Trace, window_s: tuple[float, float],
            idle_window_s: tuple[float, float] | None, inferences: int) -> EnergyReading:
    """J/inference and mean W over `window_s` with idle W (from `idle_window_s`) subtracted; see module docstring."""
    if inferences <= 0:
        return EnergyReading.unavailable(meter_name, "no timed inferences in the window")
    w0, w1 = window_s
    if w1 <= w0:
        return EnergyReading.unavailable(meter_name, "the runner reported an empty timed window")
    if trace.times and (w1 < trace.times[0] or w0 > trace.times[-1]):
        return EnergyReading.unavailable(
            meter_name, f"timed window {w0:.3f}..{w1:.3f} lies outside the meter's samples "
                        f"{trace.times[0]:.3f}..{trace.times[-1]:.3f}: the runner's window must be in the host's "
                        "time.time() clock (the meter stamps samples on the host)")
    raw_w, inside = mean_watts(trace, window_s)
    if raw_w is None:
        r = EnergyReading.unavailable(meter_name, TOO_SHORT)
        r.sample_period_s, r.samples = trace.period_s, inside
        return r
    seconds = w1 - w0
    caveats = list(trace.caveats)
    _, covered, _ = integrate(trace, window_s)
    if covered < 0.95 * seconds:
        caveats.append(f"meter samples cover {100 * covered / seconds:.0f}% of the timed window; the mean over "
                       "the covered part is used for all of it")
    idle_w = None
    if idle_window_s is None:
        caveats.append("no idle window: figures include idle power")
    else:
        idle_w, idle_n = mean_watts(trace, idle_window_s)
        if idle_w is None:
            caveats.append(f"idle window held {idle_n} sample(s), fewer than 2: figures are not idle-subtracted; "
                           "raise the idle time")
    net_w = raw_w - idle_w if idle_w is not None else raw_w
    if idle_w is not None and net_w < 0:
        caveats.append(f"idle power ({idle_w:.3f} W) exceeds the timed window's ({raw_w:.3f} W): the model's draw "
                       "is below the meter's noise; use more runs or --min-seconds")
    return EnergyReading(
        meter=meter_name, available=True, reason="; ".join(caveats),
        joules_per_inference=net_w * seconds / inferences, mean_watts=net_w,
        raw_joules_per_inference=raw_w * seconds / inferences, raw_mean_watts=raw_w,
        idle_watts=idle_w, sample_period_s=trace.period_s, samples=inside, caveats=caveats)
