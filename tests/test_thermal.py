"""Throttling snapshots and verdicts, and device descriptions, against fake sysfs/procfs trees.

The trees use the kernel's layouts (thermal_zone*/temp in millidegrees, cpufreq in kHz, cpu_capacity, Intel
thermal_throttle counters) and stand-in `vcgencmd`/`getprop` programs planted in root/bin that answer like the real
ones (`throttled=0x50005`, one property value per call), read through LocalFS under EFFAI_SYSFS_ROOT.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from effai.device_bench import device, thermal
from effai.device_bench.hostfs import LocalFS
from tests.helpers import plant, write_tree




@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "device"
    r.mkdir()
    monkeypatch.setenv("EFFAI_SYSFS_ROOT", str(r))
    return r


def board(root: Path, temp_mc: int, cur_khz: list[int], max_khz: int = 2400000,
          scaling_max: int | None = None) -> None:
    files = {"/sys/class/thermal/thermal_zone0/type": "cpu-thermal\n",
             "/sys/class/thermal/thermal_zone0/temp": f"{temp_mc}\n",
             "/sys/class/thermal/thermal_zone1/type": "vendor-degrees\n",
             "/sys/class/thermal/thermal_zone1/temp": "41\n",            # a zone in degrees, not millidegrees
             "/sys/class/thermal/thermal_zone2/type": "disabled\n",
             "/sys/class/thermal/thermal_zone2/temp": "-273000\n",       # a disabled sensor: ignored
             "/sys/class/thermal/cooling_device0/type": "fan\n"}
    for i, cur in enumerate(cur_khz):
        d = f"/sys/devices/system/cpu/cpu{i}/cpufreq"
        files |= {f"{d}/scaling_cur_freq": f"{cur}\n", f"{d}/cpuinfo_max_freq": f"{max_khz}\n",
                  f"{d}/scaling_max_freq": f"{scaling_max or max_khz}\n"}
    files["/sys/devices/system/cpu/online"] = f"0-{len(cur_khz) - 1}\n"
    write_tree(root, files)


STEADY = [10.0] * 100


def test_snapshot_reads_zones_clocks_and_skips_bad_sensors(root):
    board(root, 52300, [2400000, 1800000])
    s = thermal.snapshot(LocalFS())
    assert s["zones"] == {"thermal_zone0": {"type": "cpu-thermal", "temp_c": 52.3},
                          "thermal_zone1": {"type": "vendor-degrees", "temp_c": 41.0}}
    assert s["cpufreq"]["cpu1"] == {"cur_khz": 1800000, "max_khz": 2400000, "scaling_max_khz": 2400000}
    assert s["rpi_throttled"] is None and s["throttle_counts"] == {}


def test_verdict_none_when_clocks_and_timings_are_steady(root):
    board(root, 50000, [2400000, 2400000])
    before = thermal.snapshot(LocalFS())
    board(root, 58000, [2400000, 2400000])
    v = thermal.verdict(before, thermal.snapshot(LocalFS()), STEADY)
    assert v["verdict"] == "none" and v["drift"] == pytest.approx(1.0)
    assert "50.0 -> 58.0 C" in v["reasons"][0]
    assert v["readings"]["temp_rise_c"] == pytest.approx(8.0)


def test_verdict_throttled_when_the_max_clock_is_capped(root):
    board(root, 60000, [2400000, 2400000])
    before = thermal.snapshot(LocalFS())
    board(root, 80000, [1500000, 1500000], scaling_max=1500000)
    v = thermal.verdict(before, thermal.snapshot(LocalFS()), STEADY)
    assert v["verdict"] == "throttled"
    assert any("cpu0 max clock capped to 1500 of 2400 MHz" in r for r in v["reasons"])
    assert any("hottest zone rose 20.0 C" in r for r in v["reasons"])


def test_verdict_throttled_when_the_clock_drops_from_max(root):
    board(root, 60000, [2400000, 600000])
    before = thermal.snapshot(LocalFS())
    board(root, 62000, [1200000, 600000])
    v = thermal.verdict(before, thermal.snapshot(LocalFS()), STEADY)
    assert v["verdict"] == "throttled"
    assert v["reasons"] == ["cpu0 clock dropped from 2400 to 1200 MHz (max 2400 MHz)"]   # cpu1 was idle, not max


def test_verdict_suspected_from_drift_or_heat(root):
    slow_end = [10.0] * 90 + [12.0] * 10
    board(root, 50000, [2400000])
    s = thermal.snapshot(LocalFS())
    v = thermal.verdict(s, s, slow_end)
    assert v["verdict"] == "suspected" and v["drift"] == pytest.approx(1.2)
    assert "latency drift 1.200" in v["reasons"][0]
    board(root, 70000, [2400000])
    v = thermal.verdict(s, thermal.snapshot(LocalFS()), STEADY)
    assert v["verdict"] == "suspected" and "rose 20.0 C" in v["reasons"][0]


def test_verdict_unknown_when_nothing_is_readable_but_drift_still_counts(root):
    empty = thermal.snapshot(LocalFS())
    v = thermal.verdict(empty, empty, STEADY)
    assert v["verdict"] == "unknown" and v["drift"] == pytest.approx(1.0) and "drift 1.000" in v["reasons"][0]
    assert thermal.verdict(empty, empty, [10.0] * 90 + [11.5] * 10)["verdict"] == "suspected"
    assert thermal.verdict(empty, empty, [1.0, 2.0])["drift"] is None


def test_throttle_counters_and_rpi_flags(root):
    write_tree(root, {"/sys/devices/system/cpu/cpu0/thermal_throttle/core_throttle_count": "3\n",
                      "/sys/devices/system/cpu/cpu0/thermal_throttle/package_throttle_count": "0\n"})
    before = thermal.snapshot(LocalFS())
    write_tree(root, {"/sys/devices/system/cpu/cpu0/thermal_throttle/core_throttle_count": "7\n"})
    v = thermal.verdict(before, thermal.snapshot(LocalFS()), STEADY)
    assert v["verdict"] == "throttled" and v["reasons"] == ["cpu0 core_throttle_count rose by 4"]

    (root / "flags").write_text("0x0")
    plant(root, "vcgencmd",
          f"#!/bin/sh\n[ \"$1\" = get_throttled ] || exit 255\necho \"throttled=$(cat {root}/flags)\"\n")
    before = thermal.snapshot(LocalFS())
    assert before["rpi_throttled"] == 0
    (root / "flags").write_text("0x50005")
    v = thermal.verdict(before, thermal.snapshot(LocalFS()), STEADY)
    assert v["verdict"] == "throttled"
    assert "0x50005" in v["reasons"][-1] and "currently throttled" in v["reasons"][-1]
    assert "under-voltage occurred" in v["reasons"][-1]


# -- device description -----------------------------------------------------------------------------------------

PI5_CPUINFO = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                      f"CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n" for i in range(4)) + \
    "Revision\t: d04170\nSerial\t\t: 1a2b3c4d5e6f7a8b\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"


def test_describe_a_raspberry_pi_5(root):
    files = {"/proc/cpuinfo": PI5_CPUINFO, "/proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0\x00",
             "/etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n',
             "/proc/version": "Linux version 6.6.51+rpt-rpi-2712 (serge@raspberrypi.com) (gcc-12) #1 SMP\n"}
    for i in range(4):
        files[f"/sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq"] = "2400000\n"
    write_tree(root, files)
    d = device.describe(LocalFS())
    assert d["model"] == "Raspberry Pi 5 Model B Rev 1.0" and d["cpu"] == "Cortex-A76"
    assert d["cores"] == 4 and d["os"] == "Debian GNU/Linux 12 (bookworm)" and d["kernel"] == "6.6.51+rpt-rpi-2712"
    assert d["cpus"][0] == {"cpu": 0, "max_mhz": 2400.0} and "clusters" not in d


def test_describe_an_android_phone_with_big_little_cores(root):
    cpuinfo = "".join(f"processor\t: {i}\nCPU implementer\t: 0x41\nCPU part\t: {p}\n\n"
                      for i, p in enumerate(["0xd05"] * 4 + ["0xd41"] * 3 + ["0xd44"]))
    files = {"/proc/cpuinfo": cpuinfo, "/proc/version": "Linux version 5.10.198-android12-9 (build@x) #1\n"}
    for i, (khz, cap) in enumerate([(1800000, 250)] * 4 + [(2400000, 620)] * 3 + [(2850000, 1024)]):
        files[f"/sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq"] = f"{khz}\n"
        files[f"/sys/devices/system/cpu/cpu{i}/cpu_capacity"] = f"{cap}\n"
    write_tree(root, files)
    plant(root, "getprop", """#!/bin/sh
case "$1" in
  ro.product.model) echo 'Pixel 6' ;;
  ro.product.manufacturer) echo Google ;;
  ro.soc.model) echo 'GS101' ;;
  ro.soc.manufacturer) echo Google ;;
  ro.build.version.release) echo 14 ;;
  ro.build.version.sdk) echo 34 ;;
  ro.product.cpu.abi) echo arm64-v8a ;;
  *) echo ;;
esac
""")
    d = device.describe(LocalFS())
    assert d["model"] == "Google Pixel 6" and d["soc"] == "Google GS101" and d["os"] == "Android 14 (API 34)"
    assert d["cpu"] == "Cortex-A55 + Cortex-A78 + Cortex-X1" and d["abi"] == "arm64-v8a" and d["cores"] == 8
    assert d["clusters"] == [[0, 1, 2, 3], [4, 5, 6], [7]]
    assert d["cpus"][7] == {"cpu": 7, "max_mhz": 2850.0, "capacity": 1024}


def test_describe_this_machine(monkeypatch):
    monkeypatch.delenv("EFFAI_SYSFS_ROOT", raising=False)
    d = device.describe(LocalFS())
    assert isinstance(d["cores"], int) and d["cores"] >= 1
    assert d.get("os") and d.get("kernel") and d.get("machine")
