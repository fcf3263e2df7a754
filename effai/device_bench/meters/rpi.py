"""Raspberry Pi 5 PMIC (DA9091) rail telemetry through `vcgencmd pmic_read_adc`.

Power = sum over rails of V x A, pairing `<RAIL>_A current(n)=` with `<RAIL>_V volt(m)=` by NAME (the ADC channel
numbers differ); voltage-only channels are not summed.
Output and caveats: docs/bench.md, "effai/device_bench/meters/rpi.py".
"""

from __future__ import annotations

import re

from effai.device_bench.base import DeviceFS
from effai.device_bench.meters.sampling import SampledMeter

ARGV = ["vcgencmd", "pmic_read_adc"]
LINE = re.compile(r"([A-Za-z0-9_]+)_([AV])\s+(current|volt)\(\d+\)=\s*([-+0-9.eE]+|nan)\s*[AV]?")


def parse_pmic(text: str) -> dict[str, tuple[float, float]]:
    """{rail: (volts, amps)} for every rail with both a current and a voltage line (NUL or newline separated)."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for m in LINE.finditer(text.replace("\x00", "\n")):
        rail, unit, _kind, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        if v != v:          # nan: the channel is not populated
            continue
        (amps if unit == "A" else volts)[rail] = v
    return {rail: (volts[rail], amps[rail]) for rail in sorted(set(volts) & set(amps))}


def pmic_watts(text: str) -> float | None:
    """Sum of V x A over paired rails, None when the text has no pair (not a Pi 5, or an error message)."""
    rails = parse_pmic(text)
    return sum(v * a for v, a in rails.values()) if rails else None


class RpiPmicMeter(SampledMeter):
    name = "rpi"
    kind = "power"
    period_s = 0.05

    def __init__(self, period_s: float | None = None) -> None:
        super().__init__(period_s)
        self.rails: list[str] = []

    def probe(self, fs: DeviceFS) -> str | None:
        code, out = fs.run(ARGV, timeout=5.0)
        if code == 127:
            return "no vcgencmd (Raspberry Pi OS only)"
        if code != 0 or pmic_watts(out) is None:
            first = (out.strip().splitlines() or ["no output"])[0][:120]
            return f"`vcgencmd pmic_read_adc` gave no rail current/voltage pairs (needs a Raspberry Pi 5): {first}"
        return None

    def prepare(self, fs: DeviceFS) -> None:
        code, out = fs.run(ARGV, timeout=5.0)
        self.rails = sorted(parse_pmic(out)) if code == 0 else []
        self.caveats.append(f"Pi 5 PMIC rails ({len(self.rails)}: {', '.join(self.rails)}): SoC, RAM and I/O rails; "
                            "excludes 5 V USB/fan loads and PMIC conversion losses (wall power is higher)")

    def sample(self, fs: DeviceFS) -> float | None:
        code, out = fs.run(ARGV, timeout=5.0)
        return pmic_watts(out) if code == 0 else None

