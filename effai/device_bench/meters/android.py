"""Android battery fuel gauge: power = battery discharge current x battery voltage, sampled from power_supply sysfs.

Units (uA/mA; uV/mV/V) are decided by magnitude and the sign while `status` is Discharging, recorded in the trace's
caveats; while the phone is charging or on USB power the probe REFUSES and says how to measure (wireless adb).
Rules: docs/bench.md, "effai/device_bench/meters/android.py".
"""

from __future__ import annotations

import statistics

from effai.device_bench.base import DeviceFS, Trace
from effai.device_bench.hostfs import read_line, read_number
from effai.device_bench.meters.sampling import SampledMeter

SUPPLY = "/sys/class/power_supply"
BATTERY = f"{SUPPLY}/battery"
CHARGING_ADVICE = "charging over USB: measure with wireless adb (adb tcpip 5555; adb connect IP) and unplug the cable"
EXTERNAL = ("usb", "ac", "wireless", "dc")


def charging_reason(fs: DeviceFS) -> str | None:
    """Why the battery is not (only) discharging right now, or None when it is."""
    status = (read_line(fs, f"{BATTERY}/status") or "").strip()
    if status in ("Charging", "Full", "Not charging"):
        return f"battery status is {status}: {CHARGING_ADVICE}"
    for supply in EXTERNAL:
        if read_number(fs, f"{SUPPLY}/{supply}/online") == 1:
            return f"{supply} power supply is online: {CHARGING_ADVICE}"
    return None


def current_scale(raw_abs_median: float) -> tuple[float, str]:
    """(amps per raw unit, unit name) for current_now by magnitude; see the module docstring for the rule."""
    return (1e-6, "uA") if raw_abs_median >= 10_000 else (1e-3, "mA")


def voltage_scale(raw: float) -> tuple[float, str]:
    """(volts per raw unit, unit name) for voltage_now by magnitude."""
    if raw >= 100_000:
        return 1e-6, "uV"
    if raw >= 100:
        return 1e-3, "mV"
    return 1.0, "V"


class AndroidBatteryMeter(SampledMeter):
    name = "android"
    kind = "power"
    period_s = 0.05
    calibration_reads = 3

    def __init__(self, period_s: float | None = None) -> None:
        super().__init__(period_s)
        self.amps_per_unit = 1e-6
        self.volts_per_unit = 1e-6
        self.sign = 1.0
        self.calibration: dict[str, object] = {}
        self.raw: list[tuple[float, float]] = []     # (current_now, voltage_now) as read, for the record
        self._reversed = 0
        self._calibration_caveats: list[str] = []

    def probe(self, fs: DeviceFS) -> str | None:
        if not fs.listdir(BATTERY):
            return f"no {BATTERY} (not an Android phone, or no fuel gauge exposed)"
        for f in ("current_now", "voltage_now"):
            if read_number(fs, f"{BATTERY}/{f}") is None:
                return f"{BATTERY}/{f} is missing or unreadable on this device (SELinux or vendor kernel)"
        charging = charging_reason(fs)
        if charging:
            return charging
        status = read_line(fs, f"{BATTERY}/status")
        if status != "Discharging":
            return (f"battery status is {status!r}, not Discharging, so the current sign cannot be calibrated: "
                    f"unplug the cable and use wireless adb (adb tcpip 5555; adb connect IP)")
        return None

    def prepare(self, fs: DeviceFS) -> None:
        # Every measurement re-checks that the phone is still on battery: a cable plugged in mid-matrix would
        # otherwise be taken for the discharge direction (the sign is learned only while Discharging).
        charging = charging_reason(fs) or (None if read_line(fs, f"{BATTERY}/status") == "Discharging" else
                                           f"battery status is {read_line(fs, f'{BATTERY}/status')!r}, not "
                                           f"Discharging: {CHARGING_ADVICE}")
        if charging:
            raise OSError(charging)
        if self.calibration:          # calibrated on the first measurement: the sign convention is the device's
            self.raw = []
            self._reversed = 0
            self.caveats.extend(self._calibration_caveats)
            return
        reads = []
        for _ in range(self.calibration_reads):
            c, v = read_number(fs, f"{BATTERY}/current_now"), read_number(fs, f"{BATTERY}/voltage_now")
            if c is not None and v is not None:
                reads.append((c, v))
        if not reads:
            raise OSError(f"{BATTERY}/current_now and voltage_now became unreadable")
        med_c = statistics.median(c for c, _ in reads)
        med_v = statistics.median(v for _, v in reads)
        self.amps_per_unit, c_unit = current_scale(abs(med_c))
        self.volts_per_unit, v_unit = voltage_scale(abs(med_v))
        # probe() required status Discharging, so the sign seen now is the discharge sign.
        self.sign = -1.0 if med_c < 0 else 1.0
        self.calibration = {"current_unit": c_unit, "voltage_unit": v_unit,
                            "discharge_sign": "negative" if self.sign < 0 else "positive",
                            "calibration_raw": reads}
        self.raw = []
        self._reversed = 0
        self.caveats.append(
            f"battery fuel gauge: whole-phone power (screen, radios, background apps included); calibrated "
            f"current_now in {c_unit}, voltage_now in {v_unit}, discharge sign {self.calibration['discharge_sign']} "
            f"(raw while Discharging: current_now={med_c:g}, voltage_now={med_v:g})")
        self.caveats.append("fuel gauges update slowly (often every 0.25-1 s): use --min-seconds 10 or more")
        self._calibration_caveats = list(self.caveats)

    def sample(self, fs: DeviceFS) -> float | None:
        c, v = read_number(fs, f"{BATTERY}/current_now"), read_number(fs, f"{BATTERY}/voltage_now")
        if c is None or v is None:
            return None
        self.raw.append((c, v))
        discharge_a = self.sign * c * self.amps_per_unit
        if discharge_a < 0:
            self._reversed += 1
        return discharge_a * v * self.volts_per_unit

    def finish(self, trace: Trace) -> None:
        if self._reversed:
            trace.caveats.append(f"{self._reversed} readings show current flowing into the battery (a charger was "
                                 f"connected during the run?): {CHARGING_ADVICE}")
