"""macOS `powermetrics` (Apple silicon): CPU/GPU/ANE power estimates, one 100 ms sample per call.

Uses the "Combined Power (CPU + GPU + ANE)" line when present, else the sum of the CPU/GPU/ANE lines; runs as root or
through `sudo -n` (never prompting). The SoC's own model-based estimates, not wall power.
Output and rules: docs/bench.md, "effai/device_bench/meters/apple.py".
"""

from __future__ import annotations

import re

from effai.device_bench.base import DeviceFS
from effai.device_bench.meters.sampling import SampledMeter

POWERMETRICS = ["powermetrics", "--samplers", "cpu_power", "-i", "100", "-n", "1"]
COMBINED = re.compile(r"Combined Power[^:]*:\s*([0-9.]+)\s*(mW|W)")
DOMAIN = re.compile(r"^\s*(CPU|GPU|ANE) Power:\s*([0-9.]+)\s*(mW|W)", re.MULTILINE)


def parse_powermetrics(text: str) -> float | None:
    """Watts from one powermetrics sample: the combined line, else CPU + GPU + ANE, else None."""
    def watts(value: str, unit: str) -> float:
        return float(value) / (1000.0 if unit == "mW" else 1.0)

    m = COMBINED.search(text)
    if m:
        return watts(m.group(1), m.group(2))
    seen: dict[str, float] = {}
    for dom, value, unit in DOMAIN.findall(text):
        seen.setdefault(dom, watts(value, unit))     # the first block is the processor one; later GPU lines repeat
    return sum(seen.values()) if seen else None


class ApplePowermetricsMeter(SampledMeter):
    name = "apple"
    kind = "power"
    period_s = 0.1

    def __init__(self, period_s: float | None = None) -> None:
        super().__init__(period_s)
        self.argv: list[str] = POWERMETRICS

    def _try(self, fs: DeviceFS, argv: list[str]) -> float | None:
        code, out = fs.run(argv, timeout=10.0)
        return parse_powermetrics(out) if code == 0 else None

    def probe(self, fs: DeviceFS) -> str | None:
        code, out = fs.run(["uname", "-s"], timeout=5.0)
        if code != 0 or out.strip() != "Darwin":
            return "macOS only (powermetrics)"
        code, _ = fs.run(["powermetrics", "-h"], timeout=5.0)
        if code == 127:
            return "no powermetrics on this Mac (it ships with macOS in /usr/bin)"
        for argv in (POWERMETRICS, ["sudo", "-n", *POWERMETRICS]):
            if self._try(fs, argv) is not None:
                self.argv = argv
                return None
        return ("powermetrics needs root: run effai with sudo, or allow it without a password "
                "(sudoers: `USER ALL=(root) NOPASSWD: /usr/bin/powermetrics`)")

    def prepare(self, fs: DeviceFS) -> None:
        if self.probe(fs) is not None:            # picks direct or sudo -n
            raise OSError("powermetrics stopped working between probe and start")
        self.caveats.append("powermetrics CPU+GPU+ANE estimate (Apple's model, not wall power); each sample "
                            "integrates 100 ms")

    def sample(self, fs: DeviceFS) -> float | None:
        return self._try(fs, self.argv)
