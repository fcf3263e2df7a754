"""The adb runner, tool-output parsers and big-core pinning, without a phone.

A simulated `adb` (tests/fakes/adb) plays a phone from a temp directory (sysfs cpu tree with big.LITTLE capacities,
getprop values) and runs stand-in benchmark_model / executor_runner scripts (tests/fakes/device_tools) that really
execute the exported model with the host runtime and print the real tools' formats. The parsers are also checked
against recorded outputs in tests/fakes/outputs/ (each cites the source file whose format it follows).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import pytest

from effai.device_bench import artifact as artifact_mod
from effai.device_bench.base import BenchConfig
from effai.device_bench.runners import RunnerError, cpumask
from effai.device_bench.runners.adb import AdbRunner, check_abi, elf_machine, parse_devices
from effai.device_bench.runners.tool_output import (ToolOutputError, parse_benchmark_model, parse_executor_runner,
                                                    parse_stat)
from effai.errors import EffaiError, UsageError

FAKES = Path(__file__).parent / "fakes"
OUTPUTS = FAKES / "outputs"
SERIAL = "R5CT1234"
# A phone with 4 little (325), 3 mid (801) and 1 prime core (1024): the prime core is the big one.
CAPACITY = {0: 325, 1: 325, 2: 325, 3: 325, 4: 801, 5: 801, 6: 801, 7: 1024}


class TreeFS:
    """DeviceFS over a plain directory (paths are rooted in it), for cpumask tests."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read_text(self, path: str) -> str | None:
        p = self.root / path.lstrip("/")
        return p.read_text() if p.is_file() else None

    def listdir(self, path: str) -> list[str]:
        p = self.root / path.lstrip("/")
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        return 127, ""


def write_cpus(root: Path, capacity: dict[int, int] | None = None, freq: dict[int, int] | None = None) -> None:
    for c in sorted(set(capacity or {}) | set(freq or {})):
        d = root / "sys/devices/system/cpu" / f"cpu{c}"
        (d / "cpufreq").mkdir(parents=True, exist_ok=True)
        if capacity and c in capacity:
            (d / "cpu_capacity").write_text(f"{capacity[c]}\n")
        if freq and c in freq:
            (d / "cpufreq" / "cpuinfo_max_freq").write_text(f"{freq[c]}\n")


# ------------------------------------------------------------------------------------------------ parsers


def test_benchmark_model_recorded_output_with_e_notation():
    res = parse_benchmark_model((OUTPUTS / "benchmark_model.txt").read_text())
    assert res.load_ms == pytest.approx(48.095)
    assert res.first_ms == pytest.approx(1353.201)
    assert res.aggregate["count"] == 5
    assert res.aggregate["avg_ms"] == pytest.approx(1234.57)       # avg=1.23457e+06 us
    assert res.aggregate["median_ms"] == pytest.approx(1233.0)
    assert res.aggregate["std_ms"] == pytest.approx(3.766)
    assert res.warmup_aggregate["count"] == 3
    assert res.warmup_aggregate["avg_ms"] == pytest.approx(1274.54)
    assert not res.per_iteration and res.samples_ms == []


def test_stat_line_forms():
    assert parse_stat("count=0") == {"count": 0.0}
    same = parse_stat("count=4 curr=1500(all same)")
    assert same["avg_ms"] == same["min_ms"] == same["max_ms"] == 1.5 and same["std_ms"] == 0.0
    e = parse_stat("count=2 first=2E+06 curr=1000000 min=1000000 max=2000000 avg=1.5e+06 std=500000")
    assert e["avg_ms"] == 1500.0 and e["first_ms"] == 2000.0


def test_executor_runner_recorded_per_iteration_output():
    res = parse_executor_runner((OUTPUTS / "executor_runner.txt").read_text())
    assert res.per_iteration and res.samples_ms == pytest.approx([7.101, 4.201, 4.09, 4.13])
    assert res.load_ms == pytest.approx(3.187)
    assert res.aggregate["count"] == 4 and res.aggregate["total_ms"] == pytest.approx(19.522)


def test_executor_runner_recorded_legacy_output_is_aggregate_only():
    res = parse_executor_runner((OUTPUTS / "executor_runner_legacy.txt").read_text())
    assert not res.per_iteration and res.samples_ms == []
    assert res.aggregate["avg_ms"] == pytest.approx(4.2) and res.load_ms is None


@pytest.mark.parametrize("parse", [parse_benchmark_model, parse_executor_runner])
def test_unparsable_output_shows_last_lines(parse):
    text = "\n".join(f"line {i}" for i in range(30)) + "\nSegmentation fault\n"
    with pytest.raises(ToolOutputError) as e:
        parse(text)
    assert "Segmentation fault" in str(e.value) and "line 29" in str(e.value) and "line 5" not in str(e.value)
    parse(text, complete=False)  # a run cut short keeps what it has instead of raising


# ------------------------------------------------------------------------------------------------ cpumask


def test_big_cores_by_capacity(tmp_path):
    write_cpus(tmp_path, capacity=CAPACITY, freq={c: 1_800_000 for c in CAPACITY})
    m = cpumask.big_cores(TreeFS(tmp_path))
    assert m.cores == (7,) and m.mask == "80" and m.source == "cpu_capacity"
    wide = cpumask.for_threads(m, 4)
    assert wide.cores == (4, 5, 6, 7) and wide.mask == "f0"


def test_big_cores_by_max_freq_when_no_capacity(tmp_path):
    write_cpus(tmp_path, freq={0: 1_800_000, 1: 1_800_000, 2: 2_400_000, 3: 2_400_000})
    m = cpumask.big_cores(TreeFS(tmp_path))
    assert m.cores == (2, 3) and m.mask == "c" and m.source == "cpuinfo_max_freq"


def test_all_cores_when_nothing_readable(tmp_path):
    for c in range(3):
        (tmp_path / f"sys/devices/system/cpu/cpu{c}").mkdir(parents=True)
    m = cpumask.big_cores(TreeFS(tmp_path))
    assert m.cores == (0, 1, 2) and m.mask == "7"
    assert cpumask.parse_cpu_list("0-3,6,8-9") == [0, 1, 2, 3, 6, 8, 9]
    with pytest.raises(ValueError):
        cpumask.mask_of([])


# ------------------------------------------------------------------------------------------------ ELF / ABI


def fake_elf(path: Path, machine: int) -> Path:
    """A 64-byte ELF64 little-endian header with the given e_machine (enough for the ABI check)."""
    head = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack("<HHI", 2, machine, 1) + bytes(40)
    path.write_bytes(head)
    path.chmod(0o755)
    return path


def test_elf_machine_and_abi_check(tmp_path):
    x86 = fake_elf(tmp_path / "benchmark_model", 0x3E)
    assert elf_machine(x86) == 0x3E
    with pytest.raises(UsageError, match="x86_64.*arm64-v8a"):
        check_abi(x86, ["arm64-v8a", "armeabi-v7a"])
    assert "matches" in check_abi(fake_elf(tmp_path / "b2", 0x28), ["arm64-v8a", "armeabi-v7a"])
    assert "not an ELF" in check_abi(FAKES / "device_tools" / "benchmark_model", ["arm64-v8a"])


def test_parse_devices():
    text = ("List of devices attached\nR5CT1234               device usb:1-1 product:p model:Pixel_7 device:d "
            "transport_id:1\nemulator-5554\tunauthorized\n\n")
    assert parse_devices(text) == {"R5CT1234": "device", "emulator-5554": "unauthorized"}


# ------------------------------------------------------------------------------------------------ simulated phone


@pytest.fixture
def phone(tmp_path, monkeypatch):
    """A simulated phone R5CT1234 (arm64, 4+3+1 cores) behind tests/fakes/adb; returns a function to edit its config."""
    root = tmp_path / "adbroot"
    write_cpus(root / SERIAL, capacity=CAPACITY)
    (root / SERIAL / "data/local/tmp").mkdir(parents=True)
    config = {"devices": {SERIAL: {"state": "device", "props": {
        "ro.product.cpu.abi": "arm64-v8a", "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a,armeabi",
        "ro.product.model": "Pixel 7", "ro.soc.model": "Tensor G2", "ro.build.version.release": "14"}}}}

    def configure(**changes):
        config["devices"][SERIAL].update(changes)
        (root / "config.json").write_text(json.dumps(config))

    configure()
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("EFFAI_FAKE_ADB_ROOT", str(root))
    monkeypatch.setenv("EFFAI_FAKE_PYTHON", sys.executable)
    monkeypatch.setenv("EFFAI_RUNNER_DIR", str(FAKES / "device_tools"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    configure.root = root / SERIAL
    return configure


def device_dirs(phone) -> list[str]:
    return [p.name for p in (phone.root / "data/local/tmp").iterdir()]


def test_device_states_give_clear_errors(phone):
    cfg = BenchConfig()
    with pytest.raises(EffaiError, match="no adb device 'NOPE'.*R5CT1234"):
        AdbRunner("NOPE", cfg)
    phone(state="unauthorized")
    with pytest.raises(EffaiError, match="unauthorized: accept the RSA prompt on the phone"):
        AdbRunner(SERIAL, cfg)
    phone(state="offline")
    with pytest.raises(EffaiError, match="offline"):
        AdbRunner(SERIAL, cfg)


def test_fs_quotes_paths_and_describe(phone):
    r = AdbRunner(SERIAL, BenchConfig())
    odd = phone.root / "sdcard" / "a b;echo pwned"
    odd.parent.mkdir(parents=True)
    odd.write_text("ok\n")
    assert r.fs.read_text("/sdcard/a b;echo pwned") == "ok\n"
    assert r.fs.read_text("/sdcard/missing") is None
    assert "cpu7" in r.fs.listdir("/sys/devices/system/cpu")
    assert r.fs.run(["no-such-program"])[0] == 127
    d = r.describe()
    assert d["abi"] == "arm64-v8a" and d["serial"] == SERIAL


def test_tflite_on_phone_pinned_to_prime_core(phone, small_exports):
    art = artifact_mod.load(small_exports["tflite"].out_dir)
    cfg = BenchConfig(warmup=2, runs=5)
    t = AdbRunner(SERIAL, cfg).run(art, 1, cfg)
    assert t.runtime == "benchmark_model" and t.runtime_version.startswith("sha256:")
    assert t.extra["pinning"]["mask"] == "80" and t.extra["pinning"]["cores"] == [7]
    assert t.extra["timing"] == "aggregate-only" and t.extra["aggregate_ms"]["count"] == 5
    assert t.samples_ms == [t.extra["aggregate_ms"]["avg_ms"]]
    assert t.load_ms > 0 and t.first_ms > 0 and t.warmup == 2
    assert t.window_s[0] <= t.window_s[1]
    assert device_dirs(phone) == []  # the per-run directory was removed


def test_slow_phone_prints_e_notation(phone, small_exports):
    phone(time_scale=1e5)  # every time x100000: avg >= 1e6 us, printed as 1.2e+06-style by the tool
    art = artifact_mod.load(small_exports["tflite"].out_dir)
    cfg = BenchConfig(warmup=1, runs=3)
    t = AdbRunner(SERIAL, cfg).run(art, 4, cfg)
    agg = t.extra["aggregate_ms"]
    assert agg["avg_ms"] >= 1000.0 and agg["min_ms"] <= agg["avg_ms"] <= agg["max_ms"]
    assert t.extra["pinning"]["cores"] == [4, 5, 6, 7]  # 4 threads: widened from the prime core to prime + mids


def test_executorch_on_phone_per_iteration(phone, small_exports):
    art = artifact_mod.load(small_exports["executorch"].out_dir)
    cfg = BenchConfig(warmup=2, runs=5)
    t = AdbRunner(SERIAL, cfg).run(art, 1, cfg)
    assert t.runtime == "executor_runner" and t.extra["timing"] == "per-iteration"
    assert len(t.samples_ms) == 5 and all(s > 0 for s in t.samples_ms)
    assert t.first_ms > 0 and t.load_ms > 0
    assert device_dirs(phone) == []


def test_legacy_executor_runner_is_aggregate_only(phone, small_exports):
    phone(legacy=True)
    art = artifact_mod.load(small_exports["executorch"].out_dir)
    cfg = BenchConfig(warmup=1, runs=3)
    t = AdbRunner(SERIAL, cfg).run(art, 2, cfg)
    assert t.extra["timing"] == "aggregate-only" and len(t.samples_ms) == 1
    assert math.isnan(t.first_ms) and "threads_note" in t.extra


def test_device_vanishing_mid_run_keeps_partial(phone, small_exports):
    phone(vanish_after=5)  # first + 2 warmup + 2 timed executions, then the phone is gone
    art = artifact_mod.load(small_exports["executorch"].out_dir)
    cfg = BenchConfig(warmup=2, runs=10)
    r = AdbRunner(SERIAL, cfg)
    with pytest.raises(RunnerError, match="disconnected mid-run") as e:
        r.run(art, 1, cfg)
    assert e.value.partial is not None and len(e.value.partial.samples_ms) == 2
    assert e.value.partial.extra["complete"] is False


def test_wrong_abi_refused_before_push(phone, small_exports, tmp_path):
    art = artifact_mod.load(small_exports["tflite"].out_dir)
    x86 = fake_elf(tmp_path / "benchmark_model", 0x3E)
    cfg = BenchConfig(runner_binary=str(x86))
    with pytest.raises(UsageError, match="built for x86_64"):
        AdbRunner(SERIAL, cfg).run(art, 1, cfg)
    assert device_dirs(phone) == []


def test_onnx_and_missing_tool(phone, small_exports, monkeypatch, tmp_path):
    r = AdbRunner(SERIAL, BenchConfig())
    with pytest.raises(UsageError, match="onnxruntime_perf_test"):
        r.run(artifact_mod.load(small_exports["onnx"].out_dir), 1, BenchConfig())
    monkeypatch.setenv("EFFAI_RUNNER_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}/usr/bin:/bin")
    with pytest.raises(UsageError, match="no benchmark_model to run on the phone.*--runner-binary"):
        r.run(artifact_mod.load(small_exports["tflite"].out_dir), 1, BenchConfig())


def test_effai_bench_over_adb_end_to_end_with_battery_energy(phone, small_exports, tmp_path):
    """`effai bench --device adb:SERIAL --energy auto`: both tools, big-core pinning, and the Android battery meter
    read through adb from the simulated phone (discharging, current in uA with the negative-is-discharge sign)."""
    from tests.helpers import run_cli

    bat = phone.root / "sys/class/power_supply/battery"
    bat.mkdir(parents=True)
    for name, value in {"status": "Discharging", "current_now": "-850000", "voltage_now": "3900000"}.items():
        (bat / name).write_text(value + "\n")
    usb = phone.root / "sys/class/power_supply/usb"
    usb.mkdir(parents=True)
    (usb / "online").write_text("0\n")
    out = tmp_path / "adb.json"
    code, last, stdout, stderr = run_cli(
        "bench", str(small_exports["tflite"].out_dir), str(small_exports["executorch"].out_dir),
        "--device", f"adb:{SERIAL}", "--runs", "5", "--warmup", "1", "--min-seconds", "1.5", "--cooldown", "0",
        "--idle", "0.6", "--energy", "auto", "--out", str(out), env=dict(os.environ))
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    rep = json.loads(out.read_text())
    tfl, pte = rep["records"]
    assert tfl["runtime"] == "benchmark_model" and tfl["extra"]["runner"]["timing"] == "aggregate-only"
    assert tfl["stats"]["n"] == tfl["runs"] >= 5 and tfl["stats"]["mean"] > 0 and tfl["stats"]["p90"] is None
    assert pte["runtime"] == "executor_runner" and len(pte["samples_ms"]) == 5 and pte["stats"]["p90"] > 0
    assert all(r["device"]["name"] == f"adb:{SERIAL}" and r["device"].get("model") for r in (tfl, pte))
    e = tfl["energy"]
    assert e["meter"] == "android", e
    # a constant 0.85 A x 3.9 V draw: 3.3 W raw in the timed window, the same while idle, so ~0 W above idle
    assert e["available"] and abs(e["raw_mean_watts"] - 3.315) < 0.05 and abs(e["mean_watts"]) < 0.05, e
    assert device_dirs(phone) == []
