"""RAPL through the powercap sysfs interface (Intel, and AMD Zen on Linux >= 5.8): a cumulative energy counter.

Trace (J) = sum over the package domains intel-rapl:N of `energy_uj`, each unwrapped independently with
`max_energy_range_uj`; subzones are not added (they would count energy twice). Root-only since Linux 5.10
(CVE-2020-8694). Details: docs/bench.md, "effai/device_bench/meters/rapl.py".
"""

from __future__ import annotations

import re

from effai.device_bench.base import DeviceFS, Trace
from effai.device_bench.hostfs import read_line, read_number
from effai.device_bench.meters.sampling import SampledMeter

POWERCAP = "/sys/class/powercap"
PACKAGE = re.compile(r"^intel-rapl:\d+$")


def package_domains(fs: DeviceFS) -> list[str]:
    """Paths of the top-level RAPL domains (intel-rapl:0, intel-rapl:1, ...), not their subzones."""
    return [f"{POWERCAP}/{name}" for name in fs.listdir(POWERCAP) if PACKAGE.match(name)]


class RaplMeter(SampledMeter):
    name = "rapl"
    kind = "energy"
    period_s = 0.1

    def __init__(self, period_s: float | None = None) -> None:
        super().__init__(period_s)
        self._domains: list[str] = []
        self._ranges: list[float] = []
        self._last: list[float] = []
        self._total_uj: list[float] = []
        self.wraps = 0

    def probe(self, fs: DeviceFS) -> str | None:
        if not fs.listdir(POWERCAP):
            return f"no {POWERCAP} (not Linux on Intel/AMD, powercap not loaded, or a VM/container without RAPL)"
        domains = package_domains(fs)
        if not domains:
            return f"no package domain intel-rapl:N under {POWERCAP}"
        for d in domains:
            if read_number(fs, f"{d}/energy_uj") is None:
                return (f"{d}/energy_uj is not readable (root-only since Linux 5.10): run as root or "
                        f"`sudo chmod o+r {d}/energy_uj`")
            if not read_number(fs, f"{d}/max_energy_range_uj"):
                return f"{d}/max_energy_range_uj is missing or unreadable, so wraparound cannot be handled"
        return None

    def prepare(self, fs: DeviceFS) -> None:
        self._domains = package_domains(fs)
        self._ranges = [read_number(fs, f"{d}/max_energy_range_uj") or 0.0 for d in self._domains]
        self._last = []
        self._total_uj = [0.0] * len(self._domains)
        self.wraps = 0
        names = [read_line(fs, f"{d}/name") or d.rsplit("/", 1)[-1] for d in self._domains]
        self.caveats.append(f"RAPL {' + '.join(names)}: CPU package energy (cores, caches, uncore), not DRAM or "
                            "the rest of the board")

    def sample(self, fs: DeviceFS) -> float | None:
        now = [read_number(fs, f"{d}/energy_uj") for d in self._domains]
        if any(v is None for v in now):
            return None
        if not self._last:
            self._last = [float(v) for v in now]  # type: ignore[arg-type]
            return 0.0
        for i, v in enumerate(now):
            delta = float(v) - self._last[i]  # type: ignore[arg-type]
            if delta < 0:                     # the counter wrapped past max_energy_range_uj back to 0
                delta += self._ranges[i]
                self.wraps += 1
            self._total_uj[i] += delta
            self._last[i] = float(v)  # type: ignore[arg-type]
        return sum(self._total_uj) / 1e6

    def finish(self, trace: Trace) -> None:
        if self.wraps:
            trace.caveats.append(f"RAPL counter wrapped {self.wraps} time(s) during sampling (unwrapped)")
