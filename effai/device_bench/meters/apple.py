"""macOS `powermetrics` (Apple silicon): CPU/GPU/ANE power estimates, one 100 ms sample per call.

`powermetrics --samplers cpu_power -i 100 -n 1` prints, among frequency and residency lines:

    CPU Power: 1234 mW
    GPU Power: 56 mW
    ANE Power: 0 mW
    Combined Power (CPU + GPU + ANE): 1290 mW

The combined line is used when present (newer macOS), else the sum of the CPU/GPU/ANE lines. powermetrics needs
root: the meter runs it directly when effai is root, else through `sudo -n` (never prompting), and the probe says
how to allow it when neither works. The figures are the SoC's own model-based estimates, not wall power.
The OS is asked with `uname -s` through the DeviceFS, so a Mac reached over ssh is recognised too.
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
