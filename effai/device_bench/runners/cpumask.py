"""Which cores of a device are the big ones, as a `taskset` mask: the adb runner pins the benchmark tool there.

The cores sharing the highest cpu_capacity (arm64, 1024 = the fastest), else the highest cpuinfo_max_freq, form the
mask, read through a DeviceFS (phone, board or fake sysfs).
Why pin: docs/bench.md, "effai/device_bench/runners/cpumask.py".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effai.device_bench.base import DeviceFS

CPU_DIR = "/sys/devices/system/cpu"


@dataclass(frozen=True)
class CoreMask:
    """The chosen cores, the hex mask `taskset` takes (no 0x, as toybox and util-linux both accept), and why."""

    cores: tuple[int, ...]
    mask: str
    source: str          # "cpu_capacity" | "cpuinfo_max_freq" | "all cores (no capacity or max freq readable)"
    values: dict[int, int]  # core -> the capacity or max frequency it was ranked by

    def describe(self) -> dict:
        return {"cores": list(self.cores), "mask": self.mask, "source": self.source,
                "values": {str(k): v for k, v in self.values.items()}}


def mask_of(cores: list[int] | tuple[int, ...]) -> str:
    """Hex affinity mask for a set of core numbers: [4, 5, 6, 7] -> 'f0'."""
    if not cores:
        raise ValueError("an affinity mask needs at least one core")
    bits = 0
    for c in cores:
        if c < 0:
            raise ValueError(f"core numbers are >= 0, got {c}")
        bits |= 1 << c
    return format(bits, "x")


def list_cores(fs: DeviceFS) -> list[int]:
    """Core numbers present (cpu0, cpu1, ...), from the sysfs directory; falls back to the `possible` range list."""
    cores = sorted(int(m.group(1)) for n in fs.listdir(CPU_DIR) if (m := re.fullmatch(r"cpu(\d+)", n)))
    if cores:
        return cores
    text = fs.read_text(f"{CPU_DIR}/possible") or ""
    return parse_cpu_list(text)


def parse_cpu_list(text: str) -> list[int]:
    """Kernel cpu-list syntax ('0-3,6,8-9') -> [0, 1, 2, 3, 6, 8, 9]; [] for empty or garbled text."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            return []
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def _read_int(fs: DeviceFS, path: str) -> int | None:
    text = fs.read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def big_cores(fs: DeviceFS) -> CoreMask:
    """The cores with the highest cpu_capacity, else the highest cpuinfo_max_freq, else all cores."""
    cores = list_cores(fs)
    if not cores:
        raise ValueError(f"no cpuN entries readable under {CPU_DIR}: cannot choose cores to pin to")
    for source, leaf in (("cpu_capacity", "cpu_capacity"), ("cpuinfo_max_freq", "cpufreq/cpuinfo_max_freq")):
        values = {c: v for c in cores if (v := _read_int(fs, f"{CPU_DIR}/cpu{c}/{leaf}")) is not None}
        # A value for only some cores (offline ones hide cpufreq) still ranks the readable ones; one distinct value
        # everywhere means a symmetric CPU, where every core is a big core.
        if values:
            top = max(values.values())
            chosen = tuple(sorted(c for c, v in values.items() if v == top))
            return CoreMask(chosen, mask_of(chosen), source, values)
    return CoreMask(tuple(cores), mask_of(cores), "all cores (no capacity or max freq readable)", {})


def for_threads(big: CoreMask, threads: int) -> CoreMask:
    """The big cores, widened to the next-fastest cores when more threads than big cores were asked for (so a
    4-thread run on a 1-prime + 3-mid phone is not squeezed onto one core)."""
    if threads <= len(big.cores) or not big.values:
        return big
    ranked = sorted(big.values, key=lambda c: (-big.values[c], c))
    chosen = tuple(sorted(ranked[:threads]))
    return CoreMask(chosen, mask_of(chosen), big.source + f" (widened to {len(chosen)} cores for {threads} threads)",
                    big.values)
