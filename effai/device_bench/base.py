"""The contracts of `effai bench`: what a runner, a meter and a device filesystem are, and what they return.

Imports without torch: nothing here imports effai.export or torch, since device_bench/ reads only an artifact
directory and its manifest. One measurement: runner.run(artifact, threads, cfg) -> Timings, meter.start()/stop()
-> Trace -> energy reading, one BenchRecord appended to the report (docs/bench.md, "effai/device_bench/base.py").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

SYSFS_ROOT_ENV = "EFFAI_SYSFS_ROOT"


def sysfs_root() -> Path:
    """Root prefix under which /sys, /proc and /dev-like paths are read on the host (tests point it at fake trees)."""
    return Path(os.environ.get(SYSFS_ROOT_ENV, "/"))


@dataclass(frozen=True)
class BenchConfig:
    """How to measure. Runs are counted (`runs`) or, when `min_seconds` is set, repeated until that much time passed
    (and at least `runs`)."""

    threads: tuple[int, ...] = (2,)
    warmup: int = 10
    runs: int = 100
    min_seconds: float | None = None
    cooldown_s: float = 2.0
    idle_s: float = 1.0          # idle window measured by the meter before each timed window
    energy: str = "auto"         # auto | none | a meter name
    trust_new_host: bool = False  # ssh: accept and store an unknown host key (off: known_hosts must have it)
    runner_binary: str | None = None  # adb: path of executor_runner / benchmark_model on this machine
    seed: int = 0


@dataclass
class Timings:
    """What a runner measured for one artifact at one thread count. Times in milliseconds, device clock."""

    runtime: str                 # executorch | litert | tflite_runtime | onnxruntime | coreml | <tool name>
    runtime_version: str
    threads: int
    load_ms: float               # model load / interpreter creation
    first_ms: float              # the first inference, reported separately, never in samples_ms
    samples_ms: list[float]      # every timed iteration, in order (drift detection reads the order)
    warmup: int
    window_s: tuple[float, float] = (0.0, 0.0)   # wall-clock (time.time()) start/end of the timed loop
    extra: dict[str, Any] = field(default_factory=dict)  # runner specifics (cpu mask, tool output excerpt, ...)


@dataclass
class EnergyReading:
    """J/inference and mean W over the timed window, idle baseline subtracted; raw figures kept beside."""

    meter: str
    available: bool
    reason: str = ""             # why unavailable, or caveats when available
    joules_per_inference: float | None = None
    mean_watts: float | None = None
    raw_joules_per_inference: float | None = None   # before subtracting idle
    raw_mean_watts: float | None = None
    idle_watts: float | None = None
    sample_period_s: float | None = None
    samples: int = 0
    caveats: list[str] = field(default_factory=list)

    @classmethod
    def unavailable(cls, meter: str, reason: str) -> EnergyReading:
        return cls(meter=meter, available=False, reason=reason)


@runtime_checkable
class DeviceFS(Protocol):
    """Read-only view of a device's files and a way to run one command there (argv list, never a shell string)."""

    def read_text(self, path: str) -> str | None:
        """Contents of an absolute device path (e.g. /sys/class/powercap/intel-rapl:0/energy_uj), None if
        unreadable."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Names in a device directory; [] if missing or unreadable."""
        ...

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        """Run a command on the device; (exit code, stdout). Exit code 127 when the program does not exist."""
        ...


@runtime_checkable
class Runner(Protocol):
    """A place artifacts run: `host`, `adb:SERIAL`, `ssh:USER@HOST[:PORT]`."""

    name: str
    fs: DeviceFS

    def describe(self) -> dict[str, Any]:
        """model, soc/cpu, cores, os, python, runtime versions available: whatever the device can tell."""
        ...

    def run(self, artifact: Any, threads: int, cfg: BenchConfig) -> Timings:
        """Load the artifact (an effai artifact dir), warm up, time, clean up anything copied to the device."""
        ...

    def close(self) -> None: ...


@dataclass
class Trace:
    """What a meter recorded: host-clock timestamps (time.time()) and either instantaneous power in watts
    (`kind="power"`: battery, INA3221, PMIC, powermetrics) or a cumulative energy counter in joules, already
    unwrapped (`kind="energy"`: RAPL). energy.integrate(trace, window) turns either into joules over a window."""

    kind: str                    # "power" | "energy"
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    period_s: float = 0.0
    caveats: list[str] = field(default_factory=list)


@runtime_checkable
class Meter(Protocol):
    """An energy source. `probe` says why it cannot measure on this device (None when it can). Between start and
    stop it samples in a background thread; bench brackets idle window + timed window with one start/stop and cuts
    the trace by the runner's window_s."""

    name: str

    def probe(self, fs: DeviceFS) -> str | None: ...

    def start(self, fs: DeviceFS) -> None: ...

    def stop(self) -> Trace: ...


REPORT_SCHEMA = "effai.bench/1"


@dataclass
class BenchRecord:
    """One artifact x device x thread count: the unit appended to report.json (records[]) and compared by baseline.

    `key()` identifies the same measurement across reports (baseline comparison)."""

    artifact: dict[str, Any]     # path, model, target, precision, model_file, manifest_sha256
    device: dict[str, Any]       # name ("host", "adb:SERIAL", "ssh:pi@host"), plus describe() output
    runtime: str
    runtime_version: str
    threads: int
    warmup: int
    runs: int
    load_ms: float
    first_ms: float
    stats: dict[str, float]      # median, p90, p99, mean, std, min, max, trimmed_mean (ms); stats.summarize
    samples_ms: list[float]      # raw per-iteration timings
    throttling: dict[str, Any]   # verdict ("none" | "suspected" | "throttled" | "unknown"), reasons, drift, readings
    energy: dict[str, Any]       # EnergyReading as a dict (available False + reason when none)
    effai_version: str
    created_at: str              # UTC ISO 8601
    status: str = "ok"           # ok | error | skipped (the runtime is not on this device)
    error: str = ""              # one-line reason when status is error or skipped (the matrix goes on)
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[str, str, str, str, int]:
        a = self.artifact
        return (str(a.get("model")), str(a.get("target")), str(a.get("precision")), str(self.device.get("name")),
                self.threads)
