"""NVIDIA Jetson on-module INA3221 power monitors, found by driver name and rail labels, never by hwmon number.

Reads the hwmon (JetPack 5/6) or iio (JetPack 4) layout; power per rail is powerN_input when present, else
mV * mA / 1e6 W; the trace holds the total-input rail (VDD_IN, POM_5V_IN) when present, else the sum of the rails.
Paths per layout: docs/bench.md, "effai/device_bench/meters/jetson.py".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effai.device_bench.base import DeviceFS, Trace
from effai.device_bench.hostfs import glob, read_line, read_number
from effai.device_bench.meters.sampling import SampledMeter

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")
HWMON_DIRS = ("/sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*", "/sys/class/hwmon/hwmon*")
IIO_DIRS = ("/sys/bus/i2c/drivers/ina3221*/*/iio:device*",)


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its label and the files that give its power."""

    label: str
    power_uw: str | None = None      # hwmon powerN_input (uW)
    power_mw: str | None = None      # iio in_powerN_input (mW)
    millivolts: str | None = None
    milliamps: str | None = None

    def watts(self, fs: DeviceFS) -> float | None:
        if self.power_uw:
            p = read_number(fs, self.power_uw)
            return None if p is None else p / 1e6
        if self.power_mw:
            p = read_number(fs, self.power_mw)
            return None if p is None else p / 1e3
        mv = read_number(fs, self.millivolts or "")
        ma = read_number(fs, self.milliamps or "")
        return None if mv is None or ma is None else mv * ma / 1e6


def find_rails(fs: DeviceFS) -> list[Rail]:
    """Every labelled INA3221 channel on the device, each rail once (the bus path and the class path are the same
    hwmon device seen twice)."""
    rails: dict[str, Rail] = {}
    for pattern in HWMON_DIRS:
        for d in glob(fs, pattern):
            if not (read_line(fs, f"{d}/name") or "").startswith("ina3221"):
                continue
            names = fs.listdir(d)
            for fname in names:
                m = re.fullmatch(r"in(\d+)_label", fname)
                if not m:
                    continue
                n = m.group(1)
                label = read_line(fs, f"{d}/{fname}") or ""
                if not label or label.upper() == "NC" or label in rails:
                    continue
                if f"curr{n}_input" not in names and f"power{n}_input" not in names:
                    continue                  # a label without a current (e.g. "sum of shunt voltages")
                rails[label] = Rail(label=label,
                                    power_uw=f"{d}/power{n}_input" if f"power{n}_input" in names else None,
                                    millivolts=f"{d}/in{n}_input", milliamps=f"{d}/curr{n}_input")
    for pattern in IIO_DIRS:
        for d in glob(fs, pattern):
            names = fs.listdir(d)
            for fname in names:
                m = re.fullmatch(r"rail_name_(\d+)", fname)
                if not m:
                    continue
                n = m.group(1)
                label = read_line(fs, f"{d}/{fname}") or ""
                if not label or label in rails:
                    continue
                rails[label] = Rail(label=label,
                                    power_mw=f"{d}/in_power{n}_input" if f"in_power{n}_input" in names else None,
                                    millivolts=f"{d}/in_voltage{n}_input", milliamps=f"{d}/in_current{n}_input")
    return list(rails.values())


class JetsonMeter(SampledMeter):
    name = "jetson"
    kind = "power"
    period_s = 0.05

    def __init__(self, period_s: float | None = None) -> None:
        super().__init__(period_s)
        self.rails: list[Rail] = []
        self.total: Rail | None = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def probe(self, fs: DeviceFS) -> str | None:
        rails = find_rails(fs)
        if not rails:
            return "no INA3221 power monitor (hwmon named ina3221 with inN_label rails): not a Jetson"
        if all(r.watts(fs) is None for r in rails):
            return f"INA3221 rails {', '.join(r.label for r in rails)} found but unreadable"
        return None

    def prepare(self, fs: DeviceFS) -> None:
        self.rails = find_rails(fs)
        self.total = next((r for name in TOTAL_RAILS for r in self.rails if r.label == name), None)
        self._sums = {r.label: 0.0 for r in self.rails}
        self._counts = {r.label: 0 for r in self.rails}
        if self.total:
            self.caveats.append(f"INA3221 {self.total.label}: whole-module input power")
        else:
            self.caveats.append(f"no total-input rail ({'/'.join(TOTAL_RAILS)}): sum of rails "
                                f"{', '.join(r.label for r in self.rails)}; the rest of the module is not counted")

    def sample(self, fs: DeviceFS) -> float | None:
        watts = {}
        for r in self.rails:
            w = r.watts(fs)
            if w is not None:
                watts[r.label] = w
                self._sums[r.label] += w
                self._counts[r.label] += 1
        if self.total:
            return watts.get(self.total.label)
        return sum(watts.values()) if len(watts) == len(self.rails) else None

    def finish(self, trace: Trace) -> None:
        means = [f"{label} {self._sums[label] / n:.3f} W" for label, n in self._counts.items() if n]
        if means:
            trace.caveats.append("mean per rail over the whole trace: " + ", ".join(means))
