"""Energy meters, the host DeviceFS and energy.reading, against fake sysfs trees and planted programs.

No power sensor exists on the test machine, so every meter runs its real code path (LocalFS under EFFAI_SYSFS_ROOT,
the background sampler, the parsers) against trees built in tmp_path that use the kernel's file layouts, and
against stand-in `vcgencmd`/`powermetrics`/`uname`/`sudo` programs planted in root/bin that print the real tools'
output. Counters that must change during a window are advanced by a writer thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from effai.device_bench import energy
from effai.device_bench.base import Trace
from effai.device_bench.hostfs import LocalFS, glob, read_number
from effai.device_bench.meters import AUTO_ORDER, choose
from effai.device_bench.meters.android import AndroidBatteryMeter
from effai.device_bench.meters.apple import ApplePowermetricsMeter, parse_powermetrics
from effai.device_bench.meters.jetson import JetsonMeter, find_rails
from effai.device_bench.meters.rapl import RaplMeter
from effai.device_bench.meters.rpi import RpiPmicMeter, parse_pmic, pmic_watts
from effai.device_bench.meters.sampling import SampledMeter
from effai.errors import EffaiError, UsageError
from tests.helpers import plant, write_tree

# Real `vcgencmd pmic_read_adc` output of a Raspberry Pi 5 Model B (2 GB, Raspberry Pi OS bookworm, four busy cores),
# as recorded in ml-energy/zeus tests/device/machine/test_rpi.py (commit 09de54d90c81dac3b480212e0be76436faa62886).
# The same layout (right-aligned names, `current(n)=...A` lines first, then `volt(m)=...V`, channel numbers that
# differ between a rail's current and voltage) appears in Jeff Geerling's Pi 5 write-up (`vcgencmd pmic_read_adc`).
PMIC_READ_ADC = """\
 3V7_WL_SW_A current(0)=0.09368929A
   3V3_SYS_A current(1)=0.08783370A
   1V8_SYS_A current(2)=0.18054710A
  DDR_VDD2_A current(3)=0.22543980A
  DDR_VDDQ_A current(4)=0.06666720A
   1V1_SYS_A current(5)=0.17566740A
    0V8_SW_A current(6)=0.37670900A
  VDD_CORE_A current(7)=6.22421000A
   3V3_DAC_A current(17)=0.00006105A
   3V3_ADC_A current(18)=0.00036630A
   0V8_AON_A current(16)=0.00305250A
      HDMI_A current(22)=0.02417580A
 3V7_WL_SW_V volt(8)=3.69977600V
   3V3_SYS_V volt(9)=3.31003300V
   1V8_SYS_V volt(10)=1.80512600V
  DDR_VDD2_V volt(11)=1.10476100V
  DDR_VDDQ_V volt(12)=0.60146460V
   1V1_SYS_V volt(13)=1.11025500V
    0V8_SW_V volt(14)=0.80146440V
  VDD_CORE_V volt(15)=0.86173300V
   3V3_DAC_V volt(20)=3.31318300V
   3V3_ADC_V volt(21)=3.30677300V
   0V8_AON_V volt(19)=0.80029220V
      HDMI_V volt(23)=5.08664000V
     EXT5V_V volt(24)=5.09066000V
      BATT_V volt(25)=0.00000000V
"""
# The hand-computed sum of V x A over the 12 paired rails (EXT5V_V and BATT_V have no current line).
PMIC_PAIRS = [(0.09368929, 3.69977600), (0.08783370, 3.31003300), (0.18054710, 1.80512600),
              (0.22543980, 1.10476100), (0.06666720, 0.60146460), (0.17566740, 1.11025500),
              (0.37670900, 0.80146440), (6.22421000, 0.86173300), (0.00006105, 3.31318300),
              (0.00036630, 3.30677300), (0.00305250, 0.80029220), (0.02417580, 5.08664000)]
PMIC_WATTS = sum(a * v for a, v in PMIC_PAIRS)

# What macOS `powermetrics --samplers cpu_power -i 100 -n 1` prints (abridged: the per-cluster residency lines
# before the power lines are left out); the power line format is the one Apple's tool prints on Apple silicon.
POWERMETRICS = """\
Machine model: Mac14,2
OS version: 23F79

*** Sampled system activity (Sat Nov 30 10:00:00 2026 +0100) (102.51ms elapsed) ***

**** Processor usage ****

E-Cluster HW active frequency: 1284 MHz
P-Cluster HW active frequency: 3204 MHz

CPU Power: 1234 mW
GPU Power: 56 mW
ANE Power: 0 mW
Combined Power (CPU + GPU + ANE): 1290 mW

"""




@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "device"
    r.mkdir()
    monkeypatch.setenv("EFFAI_SYSFS_ROOT", str(r))
    return r


# -- LocalFS ----------------------------------------------------------------------------------------------------


def test_localfs_reads_lists_and_runs_under_the_root(root):
    write_tree(root, {"/sys/class/x/a": "42\n", "/sys/class/x/b/c": "y"})
    plant(root, "hello", "#!/bin/sh\necho \"hi $1\"\nexit 3\n")
    fs = LocalFS()
    assert fs.read_text("/sys/class/x/a") == "42\n"
    assert read_number(fs, "/sys/class/x/a") == 42
    assert fs.read_text("/sys/class/x/missing") is None
    assert fs.listdir("/sys/class/x") == ["a", "b"]
    assert fs.listdir("/nope") == []
    assert fs.run(["hello", "there; rm -rf /"]) == (3, "hi there; rm -rf /\n")   # argv, never a shell
    assert fs.run(["no-such-program-effai"])[0] == 127
    assert glob(fs, "/sys/class/*/b/c") == ["/sys/class/x/b/c"]
    assert glob(fs, "/sys/class/x/?") == ["/sys/class/x/a", "/sys/class/x/b"]


def test_localfs_run_times_out(root):
    plant(root, "slow", "#!/bin/sh\necho started\nexec sleep 5\n")
    t = time.monotonic()
    code, _ = LocalFS().run(["slow"], timeout=0.5)
    assert code == 124 and time.monotonic() - t < 4


def test_localfs_default_root_is_the_real_machine(monkeypatch):
    monkeypatch.delenv("EFFAI_SYSFS_ROOT", raising=False)
    fs = LocalFS()
    assert fs.root == Path("/")
    assert "processor" in (fs.read_text("/proc/cpuinfo") or "")
    assert fs.run([sys.executable, "-c", "print(6*7)"]) == (0, "42\n")


# -- the sampler ------------------------------------------------------------------------------------------------


class Ramp(SampledMeter):
    """A meter whose reading is a known function of time; every third read fails after the first few."""

    name, kind = "ramp", "power"

    def __init__(self, fail: bool = False) -> None:
        super().__init__(period_s=0.01)
        self.n, self.fail = 0, fail

    def probe(self, fs):
        return None

    def sample(self, fs):
        self.n += 1
        if self.fail and self.n > 3 and self.n % 3 == 0:
            raise OSError("device went away")
        return 2.0


def test_sampler_records_a_trace_with_its_period_and_failures():
    m = Ramp(fail=True)
    with pytest.raises(EffaiError, match="before start"):
        m.stop()
    m.start(LocalFS())
    time.sleep(0.3)
    trace = m.stop()
    assert trace.kind == "power" and len(trace.times) >= 5
    assert trace.times == sorted(trace.times) and set(trace.values) == {2.0}
    assert 0.005 < trace.period_s < 0.2
    assert any("readings failed" in c and "device went away" in c for c in trace.caveats)
    # one start/stop bracketing a window gives a constant 2 W
    w = (trace.times[0], trace.times[-1])
    r = energy.reading("ramp", trace, w, None, inferences=10)
    assert r.available and r.mean_watts == pytest.approx(2.0)
    # bench reuses one meter for every artifact: a second start/stop gives a fresh trace
    m.start(LocalFS())
    with pytest.raises(EffaiError, match="started twice"):
        m.start(LocalFS())
    time.sleep(0.05)
    again = m.stop()
    assert again.times[0] > trace.times[-1] and len(again.times) >= 2


# -- RAPL -------------------------------------------------------------------------------------------------------


def rapl_tree(root: Path, energies: tuple[int, int], max_range: int) -> None:
    files = {}
    for pkg, e in enumerate(energies):
        d = f"/sys/class/powercap/intel-rapl:{pkg}"
        files |= {f"{d}/name": f"package-{pkg}\n", f"{d}/energy_uj": f"{e}\n",
                  f"{d}/max_energy_range_uj": f"{max_range}\n",
                  # subzones: counted inside the package already; a meter that adds them double counts
                  f"{d}/intel-rapl:{pkg}:0/name": "core\n", f"{d}/intel-rapl:{pkg}:0/energy_uj": "999999\n",
                  f"/sys/class/powercap/intel-rapl:{pkg}:0/energy_uj": "999999\n"}
    write_tree(root, files)


def set_energy(root: Path, pkg: int, uj: int) -> None:
    p = root / f"sys/class/powercap/intel-rapl:{pkg}/energy_uj"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(f"{uj}\n")
    os.replace(tmp, p)


def test_rapl_unwraps_each_package_and_skips_subzones(root):
    rng = 10_000_000     # 10 J
    rapl_tree(root, (9_000_000, 100), rng)
    fs = LocalFS()
    m = RaplMeter()
    assert m.probe(fs) is None
    m.prepare(fs)
    assert m.sample(fs) == 0.0
    # pkg0: 9.0 J -> wraps -> 1.5 J is +2.5 J; pkg1: +1.0 J
    set_energy(root, 0, 1_500_000)
    set_energy(root, 1, 1_000_100)
    assert m.sample(fs) == pytest.approx(3.5)
    set_energy(root, 0, 4_500_000)     # +3 J
    set_energy(root, 1, 1_500_100)     # +0.5 J
    assert m.sample(fs) == pytest.approx(7.0)
    assert m.wraps == 1


def test_rapl_meter_measures_watts_through_a_wraparound(root):
    rng, watts = 3_000_000, (5.0, 3.0)          # package 0 wraps every 0.6 s
    rapl_tree(root, (2_500_000, 0), rng)
    t0, stop = time.time(), threading.Event()

    def writer():
        while not stop.is_set():
            dt = time.time() - t0
            set_energy(root, 0, int(2_500_000 + watts[0] * dt * 1e6) % rng)
            set_energy(root, 1, int(watts[1] * dt * 1e6) % rng)
            time.sleep(0.002)

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        meter, why = choose("auto", LocalFS())
        assert isinstance(meter, RaplMeter), why
        meter.period_s = 0.02
        meter.start(LocalFS())
        time.sleep(1.2)
        trace = meter.stop()
    finally:
        stop.set()
        th.join()
    assert trace.kind == "energy" and meter.wraps >= 1
    assert any("wrapped" in c for c in trace.caveats)
    window = (trace.times[1], trace.times[-2])
    r = energy.reading("rapl", trace, window, None, inferences=100)
    assert r.available and r.raw_mean_watts == pytest.approx(8.0, rel=0.1)


def test_rapl_probe_explains_an_unreadable_counter(root):
    rapl_tree(root, (1, 1), 10)
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    counter.unlink()
    counter.mkdir()          # a read that fails (as mode 0400 does for non-root; tests may run as root)
    why = RaplMeter().probe(LocalFS())
    assert "not readable" in why and "chmod o+r" in why


# -- Android battery --------------------------------------------------------------------------------------------


def battery(root: Path, current: str, voltage: str, status: str = "Discharging", usb: str = "0") -> None:
    write_tree(root, {"/sys/class/power_supply/battery/current_now": current + "\n",
                      "/sys/class/power_supply/battery/voltage_now": voltage + "\n",
                      "/sys/class/power_supply/battery/status": status + "\n",
                      "/sys/class/power_supply/usb/online": usb + "\n",
                      "/sys/class/power_supply/ac/online": "0\n"})


@pytest.mark.parametrize("current,voltage,unit,sign", [
    ("-412000", "3900000", "uA", "negative"),     # Pixel-style: uA, negative while discharging
    ("412000", "3900000", "uA", "positive"),      # Samsung-style: uA, positive while discharging
    ("412", "3900", "mA", "positive"),            # mA and mV drivers
    ("-412", "3900000", "mA", "negative"),
])
def test_android_calibrates_unit_and_sign(root, current, voltage, unit, sign):
    battery(root, current, voltage)
    fs = LocalFS()
    m = AndroidBatteryMeter()
    assert m.probe(fs) is None
    m.prepare(fs)
    assert m.calibration["current_unit"] == unit and m.calibration["discharge_sign"] == sign
    assert m.sample(fs) == pytest.approx(0.412 * 3.9)
    assert m.raw[-1] == (float(current), float(voltage))      # raw readings kept
    assert any(f"in {unit}" in c and f"discharge sign {sign}" in c for c in m.caveats)


def test_android_flags_current_into_the_battery_during_the_run(root):
    battery(root, "-500000", "4000000")
    fs = LocalFS()
    m = AndroidBatteryMeter(period_s=0.01)
    m.start(fs)
    battery(root, "300000", "4000000")        # a charger appears: the sign flips
    time.sleep(0.1)
    trace = m.stop()
    assert trace.values[0] == pytest.approx(2.0) and trace.values[-1] == pytest.approx(-1.2)
    assert any("flowing into the battery" in c and "adb tcpip 5555" in c for c in trace.caveats)


def test_android_keeps_its_first_calibration_and_refuses_a_cable_plugged_in_mid_matrix(root):
    battery(root, "-500000", "4000000")
    fs = LocalFS()
    m = AndroidBatteryMeter(period_s=0.01)
    m.start(fs)
    first = m.stop()
    assert first.values[0] == pytest.approx(2.0) and any("discharge sign negative" in c for c in first.caveats)
    battery(root, "300000", "4000000", status="Charging", usb="1")     # the cable goes in between measurements
    with pytest.raises(OSError, match="charging over USB"):
        m.start(fs)
    battery(root, "-250000", "4000000")                                # unplugged again: same sign as learned
    m.start(fs)
    again = m.stop()
    assert again.values[0] == pytest.approx(1.0) and any("discharge sign negative" in c for c in again.caveats)


@pytest.mark.parametrize("status,usb", [("Charging", "0"), ("Full", "0"), ("Discharging", "1")])
def test_android_refuses_while_charging_and_says_how_to_measure(root, status, usb):
    battery(root, "-400000", "3900000", status=status, usb=usb)
    meter, why = choose("android", LocalFS())
    assert meter is None
    assert "charging over USB" in why and "adb tcpip 5555; adb connect IP" in why and "unplug" in why


# -- Jetson INA3221 ---------------------------------------------------------------------------------------------


def ina3221_channels(d: str, rails: list[tuple[str, int, int]], power_files: bool = False) -> dict[str, str]:
    files = {f"{d}/name": "ina3221\n"}
    for n, (label, mv, ma) in enumerate(rails, start=1):
        files |= {f"{d}/in{n}_label": label + "\n", f"{d}/in{n}_input": f"{mv}\n", f"{d}/curr{n}_input": f"{ma}\n"}
        if power_files:
            files[f"{d}/power{n}_input"] = f"{mv * ma}\n"       # uW = mV * mA
    files[f"{d}/in7_label"] = "sum of shunt voltages\n"          # labelled, but no current: not a rail
    files[f"{d}/in7_input"] = "12\n"
    return files


def test_jetson_finds_rails_by_label_on_the_i2c_bus_layout(root):
    d = "/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    write_tree(root, ina3221_channels(d, [("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400),
                                          ("VDD_SOC", 5000, 300)]))
    # the same device also appears under /sys/class/hwmon; it must not be counted twice
    (root / "sys/class/hwmon").mkdir(parents=True)
    os.symlink(root / d.lstrip("/"), root / "sys/class/hwmon/hwmon3")
    fs = LocalFS()
    assert sorted(r.label for r in find_rails(fs)) == ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]
    meter, why = choose("auto", fs)
    assert isinstance(meter, JetsonMeter), why
    meter.prepare(fs)
    assert meter.total.label == "VDD_IN"
    assert meter.sample(fs) == pytest.approx(6.0)          # VDD_IN only: 5 V x 1.2 A


def test_jetson_class_hwmon_layout_with_power_files_and_no_total_rail(root):
    write_tree(root, {"/sys/class/hwmon/hwmon0/name": "cpu_thermal\n", "/sys/class/hwmon/hwmon0/in1_label": "x\n"})
    write_tree(root, ina3221_channels("/sys/class/hwmon/hwmon2", [("VDD_GPU_SOC", 5000, 600),
                                                                   ("VDD_CPU_CV", 5000, 200), ("NC", 0, 0)],
                                      power_files=True))
    fs = LocalFS()
    assert sorted(r.label for r in find_rails(fs)) == ["VDD_CPU_CV", "VDD_GPU_SOC"]
    m = JetsonMeter(period_s=0.01)
    m.start(fs)
    time.sleep(0.05)
    trace = m.stop()
    assert trace.values and all(v == pytest.approx(4.0) for v in trace.values)   # 3 W + 1 W, from power*_input
    assert any("no total-input rail" in c for c in trace.caveats)
    assert any("VDD_GPU_SOC 3.000 W" in c for c in trace.caveats)


def test_jetson_legacy_iio_layout(root):
    d = "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    write_tree(root, {f"{d}/rail_name_0": "POM_5V_IN\n", f"{d}/in_power0_input": "2500\n",
                      f"{d}/in_voltage0_input": "5000\n", f"{d}/in_current0_input": "500\n",
                      f"{d}/rail_name_1": "POM_5V_GPU\n", f"{d}/in_power1_input": "400\n"})
    fs = LocalFS()
    m = JetsonMeter()
    assert m.probe(fs) is None
    m.prepare(fs)
    assert m.total.label == "POM_5V_IN" and m.sample(fs) == pytest.approx(2.5)


# -- Raspberry Pi 5 PMIC ----------------------------------------------------------------------------------------


def fake_vcgencmd(root: Path, pmic_text: str | None) -> None:
    """A vcgencmd stand-in: prints the recorded pmic_read_adc text, or what a Pi 4 firmware answers."""
    (root / "pmic.txt").write_text(pmic_text or "")
    plant(root, "vcgencmd", f"""#!/bin/sh
case "$1" in
  pmic_read_adc)
    if [ -s "{root}/pmic.txt" ]; then cat "{root}/pmic.txt"; exit 0; fi
    echo 'error=1 error_msg="Command not registered"'; exit 255 ;;
  get_throttled) echo 'throttled=0x0' ;;
  *) echo 'error=1 error_msg="Command not registered"'; exit 255 ;;
esac
""")


def test_pmic_parser_pairs_rails_by_name():
    rails = parse_pmic(PMIC_READ_ADC)
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails
    assert rails["VDD_CORE"] == (0.861733, 6.22421)
    assert pmic_watts(PMIC_READ_ADC) == pytest.approx(PMIC_WATTS)
    assert pmic_watts(PMIC_READ_ADC.replace("\n", "\x00")) == pytest.approx(PMIC_WATTS)
    assert pmic_watts('error=1 error_msg="Command not registered"\n') is None


def test_rpi_meter_runs_the_planted_vcgencmd(root):
    fake_vcgencmd(root, PMIC_READ_ADC)
    fs = LocalFS()
    meter, why = choose("auto", fs)
    assert isinstance(meter, RpiPmicMeter), why
    meter.period_s = 0.02
    meter.start(fs)
    time.sleep(0.15)
    trace = meter.stop()
    assert len(trace.values) >= 2 and all(v == pytest.approx(PMIC_WATTS) for v in trace.values)
    assert any("12:" in c and "VDD_CORE" in c for c in trace.caveats)


def test_rpi_probe_on_an_older_pi(root):
    fake_vcgencmd(root, None)
    why = RpiPmicMeter().probe(LocalFS())
    assert "needs a Raspberry Pi 5" in why and "Command not registered" in why


# -- macOS powermetrics -----------------------------------------------------------------------------------------


def test_powermetrics_parser():
    assert parse_powermetrics(POWERMETRICS) == pytest.approx(1.29)
    only_domains = POWERMETRICS.replace("Combined Power (CPU + GPU + ANE): 1290 mW\n", "")
    assert parse_powermetrics(only_domains) == pytest.approx(1.29)
    assert parse_powermetrics("CPU Power: 2.5 W\n") == pytest.approx(2.5)
    assert parse_powermetrics("nothing\n") is None


def test_apple_meter_on_a_simulated_mac(root):
    (root / "pm.txt").write_text(POWERMETRICS)
    plant(root, "uname", "#!/bin/sh\necho Darwin\n")
    plant(root, "powermetrics", f"#!/bin/sh\n[ \"$1\" = -h ] && exit 0\ncat '{root}/pm.txt'\n")
    fs = LocalFS()
    meter, why = choose("apple", fs)
    assert isinstance(meter, ApplePowermetricsMeter), why
    meter.period_s = 0.02
    meter.start(fs)
    time.sleep(0.1)
    trace = meter.stop()
    assert trace.values and all(v == pytest.approx(1.29) for v in trace.values)


def test_apple_meter_says_powermetrics_needs_root(root):
    plant(root, "uname", "#!/bin/sh\necho Darwin\n")
    plant(root, "powermetrics", "#!/bin/sh\n[ \"$1\" = -h ] && exit 0\n"
                                "echo 'powermetrics must be invoked as the superuser' >&2\nexit 1\n")
    plant(root, "sudo", "#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    meter, why = choose("apple", LocalFS())
    assert meter is None and "needs root" in why and "NOPASSWD" in why


# -- choose -----------------------------------------------------------------------------------------------------


def test_choose_none_unknown_and_empty_tree(root):
    fs = LocalFS()
    assert choose("none", fs) == (None, "disabled (--energy none)")
    with pytest.raises(UsageError, match="choose one of: android, apple, auto, jetson, none, rapl, rpi"):
        choose("rapll", fs)
    meter, why = choose("auto", fs)
    assert meter is None and why.startswith("unavailable: ")
    for name in AUTO_ORDER:
        assert f"{name}: " in why
    assert choose("rapl", fs) == (None, why.split("; ")[0])


def test_choose_auto_on_this_machine_is_unavailable_with_reasons(monkeypatch):
    """The real host (no EFFAI_SYSFS_ROOT): the test machine has no readable power sensor."""
    monkeypatch.delenv("EFFAI_SYSFS_ROOT", raising=False)
    readable_rapl = any(os.access(p, os.R_OK) for p in Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj"))
    if readable_rapl or Path("/sys/class/power_supply/battery").exists():
        pytest.skip("this machine has a readable power sensor")
    meter, why = choose("auto", LocalFS())
    assert meter is None and why.startswith("unavailable: rapl: ")
    assert "apple: macOS only" in why and "rpi: " in why and "android: " in why and "jetson: " in why


def test_meters_import_without_torch():
    code = ("import sys, effai.device_bench.meters, effai.device_bench.energy, effai.device_bench.thermal, "
            "effai.device_bench.device, effai.device_bench.hostfs; assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -- energy.reading ---------------------------------------------------------------------------------------------


def test_reading_integrates_a_power_trace_by_trapezoid():
    trace = Trace(kind="power", times=[0, 1, 2, 3, 4], values=[2, 4, 4, 2, 2], period_s=1.0, caveats=["c1"])
    # window 0.5..3.5: P(0.5)=3 (interpolated), then 4, 4, 2, and P(3.5)=2
    # E = 0.5*(3+4)/2 + 1*(4+4)/2 + 1*(4+2)/2 + 0.5*(2+2)/2 = 1.75 + 4 + 3 + 1 = 9.75 J over 3 s = 3.25 W
    r = energy.reading("x", trace, (0.5, 3.5), None, inferences=39)
    assert r.available and r.samples == 3 and r.sample_period_s == 1.0
    assert r.raw_mean_watts == pytest.approx(3.25) and r.mean_watts == pytest.approx(3.25)
    assert r.raw_joules_per_inference == pytest.approx(9.75 / 39) == r.joules_per_inference
    assert r.idle_watts is None and "c1" in r.caveats and any("no idle window" in c for c in r.caveats)


def test_reading_subtracts_idle_power():
    # idle 1 W for t in [0, 4], then 5 W while the model runs in [5, 9]
    times = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    values = [1, 1, 1, 1, 1, 5, 5, 5, 5, 5]
    trace = Trace(kind="power", times=times, values=values, period_s=1.0)
    r = energy.reading("x", trace, (5, 9), (0, 4), inferences=8)
    assert r.idle_watts == pytest.approx(1.0) and r.raw_mean_watts == pytest.approx(5.0)
    assert r.mean_watts == pytest.approx(4.0)
    assert r.joules_per_inference == pytest.approx((20.0 - 1.0 * 4) / 8)        # (E - idle W * dt) / n = 2 J
    assert r.raw_joules_per_inference == pytest.approx(20.0 / 8)


def test_reading_of_an_energy_counter_interpolates_the_edges():
    trace = Trace(kind="energy", times=[0, 1, 2, 3, 4], values=[0, 2, 4, 7, 10], period_s=1.0)
    # E(0.5)=1, E(3.5)=8.5: 7.5 J over 3 s = 2.5 W; idle (0..1): 2 J over 1 s = 2 W
    r = energy.reading("rapl", trace, (0.5, 3.5), (0, 1), inferences=30)
    assert r.raw_mean_watts == pytest.approx(2.5) and r.idle_watts == pytest.approx(2.0)
    assert r.mean_watts == pytest.approx(0.5) and r.joules_per_inference == pytest.approx(0.5 * 3 / 30)


def test_reading_refuses_windows_shorter_than_the_sampling_period():
    trace = Trace(kind="power", times=[0, 1, 2, 3], values=[1, 1, 1, 1], period_s=1.0)
    r = energy.reading("x", trace, (1.2, 1.8), None, inferences=5)
    assert not r.available and r.reason == "timed window shorter than the sampling period; use --min-seconds"
    assert r.joules_per_inference is None
    r = energy.reading("x", trace, (0, 3), (1.2, 1.8), inferences=5)      # idle window too short: no subtraction
    assert r.available and r.idle_watts is None and any("not idle-subtracted" in c for c in r.caveats)
    assert not energy.reading("x", trace, (0, 3), None, inferences=0).available
    r = energy.reading("x", trace, (1000.0, 1001.0), None, inferences=5)     # a device clock, not the host's
    assert not r.available and "outside the meter's samples" in r.reason


def test_reading_notes_partial_coverage_and_negative_net():
    trace = Trace(kind="power", times=[0, 1, 2, 3], values=[3, 3, 1, 1], period_s=1.0)
    r = energy.reading("x", trace, (2, 6), (0, 1), inferences=4)   # samples cover 2..3 of 2..6
    assert r.available and r.raw_mean_watts == pytest.approx(1.0)
    assert any("cover 25%" in c for c in r.caveats) and any("exceeds" in c for c in r.caveats)
    assert r.mean_watts == pytest.approx(-2.0)
