"""Energy meters behind one protocol (base.Meter), chosen by `--energy auto|none|NAME`.

NAME: rapl, jetson, rpi, android, apple (meters/<name>.py). `auto` probes them in that order and takes the first that
can measure; where none can, energy is "unavailable: <why each failed>", never a guess. Meters read the device only
through its DeviceFS, so one meter measures the host, an adb phone or an ssh board (docs/bench.md, "Energy meters").
"""

from __future__ import annotations

from collections.abc import Callable

from effai.device_bench.base import DeviceFS, Meter
from effai.device_bench.meters.android import AndroidBatteryMeter
from effai.device_bench.meters.apple import ApplePowermetricsMeter
from effai.device_bench.meters.jetson import JetsonMeter
from effai.device_bench.meters.rapl import RaplMeter
from effai.device_bench.meters.rpi import RpiPmicMeter
from effai.errors import UsageError, choices_hint
from effai.registry import Registry

METERS: Registry[Callable[[], Meter]] = Registry("energy meter")
METERS.register("rapl", RaplMeter)
METERS.register("jetson", JetsonMeter)
METERS.register("rpi", RpiPmicMeter)
METERS.register("android", AndroidBatteryMeter)
METERS.register("apple", ApplePowermetricsMeter)

AUTO_ORDER = ("rapl", "jetson", "rpi", "android", "apple")


def _probe(name: str, fs: DeviceFS) -> tuple[Meter | None, str]:
    meter = METERS.get(name)()
    try:
        why = meter.probe(fs)
    except Exception as e:  # a device that fails while being asked is a reason, not a crash
        why = f"probe failed: {type(e).__name__}: {e}"
    return (meter, f"{name}: can measure") if why is None else (None, f"{name}: {why}")


def choose(spec: str, fs: DeviceFS) -> tuple[Meter | None, str]:
    """(meter, why) for `--energy SPEC`: `auto` the first meter whose probe passes, `none` no meter, a NAME that
    meter. When no meter can measure the meter is None and `why` is "unavailable: ..." naming each reason.
    An unknown NAME raises UsageError listing the choices."""
    spec = (spec or "auto").strip().lower()
    if spec == "none":
        return None, "disabled (--energy none)"
    if spec == "auto":
        reasons = []
        for name in AUTO_ORDER:
            meter, why = _probe(name, fs)
            if meter is not None:
                return meter, f"auto: {why}"
            reasons.append(why)
        return None, "unavailable: " + "; ".join(reasons)
    if spec not in METERS:
        raise UsageError(f"--energy {spec!r} is not a meter; {choices_hint(spec, ['auto', 'none', *METERS.names()])}")
    meter, why = _probe(spec, fs)
    return (meter, why) if meter is not None else (None, f"unavailable: {why}")


__all__ = ["AUTO_ORDER", "METERS", "choose"]
