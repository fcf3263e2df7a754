"""Throttling: what the device says about its temperature and clocks before and after a run, and a verdict.

snapshot(fs) reads thermal zones, cpufreq, Intel throttle counters and `vcgencmd get_throttled` where readable;
verdict() adds the timings' drift (median of the last decile / median of the first decile): throttled | suspected
(drift > 1.10, or the hottest zone +15 C) | none | unknown.
Files and rules: docs/bench.md, "effai/device_bench/thermal.py".
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

from effai.device_bench.base import DeviceFS
from effai.device_bench.hostfs import read_line, read_number

THERMAL = "/sys/class/thermal"
CPU = "/sys/devices/system/cpu"
DRIFT_LIMIT = 1.10
TEMP_RISE_C = 15.0
# `vcgencmd get_throttled` bits (Raspberry Pi documentation): now (0-3) and since boot (16-19).
RPI_BITS = {0: "under-voltage", 1: "ARM frequency capped", 2: "currently throttled", 3: "soft temperature limit",
            16: "under-voltage occurred", 17: "frequency capping occurred", 18: "throttling occurred",
            19: "soft temperature limit occurred"}


def _celsius(raw: float) -> float | None:
    """Zone temp to C: millidegrees as the ABI says, degrees on the few vendor zones that report them; None for
    disabled sensors (absurd values)."""
    c = raw / 1000.0 if abs(raw) >= 200 else raw
    return c if -40.0 <= c <= 150.0 else None


def cpus(fs: DeviceFS) -> list[str]:
    """cpu0, cpu1, ... present under /sys/devices/system/cpu, in numeric order."""
    names = [n for n in fs.listdir(CPU) if re.fullmatch(r"cpu\d+", n)]
    return sorted(names, key=lambda n: int(n[3:]))


def snapshot(fs: DeviceFS) -> dict[str, Any]:
    """Temperatures, clocks and throttle flags readable now (empty sections when not readable)."""
    zones: dict[str, dict[str, Any]] = {}
    for name in fs.listdir(THERMAL):
        if not name.startswith("thermal_zone"):
            continue
        raw = read_number(fs, f"{THERMAL}/{name}/temp")
        c = _celsius(raw) if raw is not None else None
        if c is not None:
            zones[name] = {"type": read_line(fs, f"{THERMAL}/{name}/type") or "", "temp_c": round(c, 2)}
    freqs: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, float]] = {}
    for cpu in cpus(fs):
        entry = {}
        for key, f in (("cur_khz", "scaling_cur_freq"), ("max_khz", "cpuinfo_max_freq"),
                       ("scaling_max_khz", "scaling_max_freq")):
            v = read_number(fs, f"{CPU}/{cpu}/cpufreq/{f}")
            if v is not None:
                entry[key] = v
        if entry:
            freqs[cpu] = entry
        tc = {}
        for f in ("core_throttle_count", "package_throttle_count"):
            v = read_number(fs, f"{CPU}/{cpu}/thermal_throttle/{f}")
            if v is not None:
                tc[f] = v
        if tc:
            counts[cpu] = tc
    rpi = None
    code, out = fs.run(["vcgencmd", "get_throttled"], timeout=5.0)
    m = re.search(r"throttled=(0x[0-9a-fA-F]+)", out) if code == 0 else None
    if m:
        rpi = int(m.group(1), 16)
    return {"time": time.time(), "zones": zones, "cpufreq": freqs, "throttle_counts": counts, "rpi_throttled": rpi}


def drift(samples_ms: list[float]) -> float | None:
    """Median of the last decile / median of the first decile (None with fewer than 10 samples)."""
    n = len(samples_ms)
    if n < 10:
        return None
    k = n // 10
    first, last = statistics.median(samples_ms[:k]), statistics.median(samples_ms[-k:])
    return last / first if first > 0 else None


def _readable(s: dict[str, Any] | None) -> bool:
    return bool(s) and bool(s.get("zones") or s.get("cpufreq") or s.get("throttle_counts")
                            or s.get("rpi_throttled") is not None)


def _max_temp(s: dict[str, Any]) -> float | None:
    temps = [z["temp_c"] for z in (s.get("zones") or {}).values()]
    return max(temps) if temps else None


def _clock_reasons(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    reasons = []
    for cpu, a in (after.get("cpufreq") or {}).items():
        b = (before.get("cpufreq") or {}).get(cpu, {})
        hw = a.get("max_khz") or b.get("max_khz")
        cap_a, cap_b = a.get("scaling_max_khz"), b.get("scaling_max_khz")
        if hw and cap_a and cap_a < hw and (cap_b is None or cap_a < cap_b):
            reasons.append(f"{cpu} max clock capped to {cap_a / 1000:.0f} of {hw / 1000:.0f} MHz")
            continue
        cur_a, cur_b = a.get("cur_khz"), b.get("cur_khz")
        if hw and cur_a and cur_b and cur_b >= 0.95 * hw and cur_a < 0.9 * cur_b:
            reasons.append(f"{cpu} clock dropped from {cur_b / 1000:.0f} to {cur_a / 1000:.0f} MHz "
                           f"(max {hw / 1000:.0f} MHz)")
    return reasons


def verdict(before: dict[str, Any], after: dict[str, Any], samples_ms: list[float]) -> dict[str, Any]:
    """{"verdict", "reasons", "drift", "readings"} for one timed run; see the module docstring for the rules."""
    before, after = before or {}, after or {}
    d = drift(samples_ms)
    throttled = _clock_reasons(before, after)
    for cpu, a in (after.get("throttle_counts") or {}).items():
        b = (before.get("throttle_counts") or {}).get(cpu, {})
        for key, v in a.items():
            if key in b and v > b[key]:
                throttled.append(f"{cpu} {key} rose by {v - b[key]:.0f}")
    flags_a, flags_b = after.get("rpi_throttled"), before.get("rpi_throttled") or 0
    if flags_a is not None:
        now = [RPI_BITS[i] for i in (0, 1, 2, 3) if flags_a & (1 << i)]
        new = [RPI_BITS[i] for i in (16, 17, 18, 19) if flags_a & (1 << i) and not flags_b & (1 << i)]
        if now or new:
            throttled.append(f"vcgencmd get_throttled=0x{flags_a:x}: {', '.join(now + new)}")
    suspected = []
    if d is not None and d > DRIFT_LIMIT:
        suspected.append(f"latency drift {d:.3f}: last-decile median is {100 * (d - 1):.0f}% above the first's")
    t_b, t_a = _max_temp(before), _max_temp(after)
    rise = t_a - t_b if t_a is not None and t_b is not None else None
    if rise is not None and rise > TEMP_RISE_C:
        suspected.append(f"hottest zone rose {rise:.1f} C ({t_b:.1f} -> {t_a:.1f} C)")
    readable = _readable(before) or _readable(after)
    drift_text = f"drift {d:.3f}" if d is not None else "drift not computed (fewer than 10 samples)"
    if throttled:
        v, reasons = "throttled", throttled + suspected
    elif suspected:
        v, reasons = "suspected", suspected
    elif readable:
        temps = f"hottest zone {t_b:.1f} -> {t_a:.1f} C, " if rise is not None else ""
        v, reasons = "none", [f"{temps}clocks not capped, {drift_text}"]
    else:
        v, reasons = "unknown", [f"no thermal zone, cpufreq or throttle flag readable; {drift_text}"]
    readings = {"max_temp_c": [t_b, t_a], "temp_rise_c": rise,
                "min_cur_over_max": _min_ratio(after)}
    return {"verdict": v, "reasons": reasons, "drift": d, "readings": readings}


def _min_ratio(s: dict[str, Any]) -> float | None:
    ratios = [f["cur_khz"] / f["max_khz"] for f in (s.get("cpufreq") or {}).values()
              if f.get("cur_khz") and f.get("max_khz")]
    return round(min(ratios), 3) if ratios else None
