"""Where artifacts run: `host` (this Python), `adb:SERIAL` (an Android phone), `ssh:USER@HOST[:PORT]` (a board).

`open_runner(spec, cfg)` parses the --device spec and builds the runner; the adb and ssh runners (and their
paramiko / subprocess machinery) are imported only when asked for, so `effai bench --device host` loads neither.
Every runner follows base.Runner and raises RunnerError when the device fails mid-run, carrying the timings
measured so far so the report keeps them (marked incomplete).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from effai.device_bench.base import BenchConfig, Runner, Timings
from effai.errors import EffaiError, UsageError
from effai.registry import Registry

FORMS = "host | adb:SERIAL | ssh:USER@HOST[:PORT]"


class RunnerError(EffaiError):
    """The device failed during a run (disconnect, crash, unparsable output). `partial` holds what was measured
    before the failure, or None; bench keeps it in a record with status "error"."""

    def __init__(self, message: str, partial: Timings | None = None) -> None:
        super().__init__(message)
        self.partial = partial


def _host(arg: str, cfg: BenchConfig) -> Runner:
    if arg:
        raise UsageError(f"--device host takes no argument (got 'host:{arg}'); use one of: {FORMS}")
    from effai.device_bench.runners.host import HostRunner

    return HostRunner(cfg)


def _adb(arg: str, cfg: BenchConfig) -> Runner:
    if not arg:
        raise UsageError(f"--device adb needs a serial, like adb:R5CT1234 (see `adb devices`); forms: {FORMS}")
    from effai.device_bench.runners.adb import AdbRunner

    return AdbRunner(arg, cfg)


def _ssh(arg: str, cfg: BenchConfig) -> Runner:
    user, at, host = arg.partition("@")
    if not at or not user or not host or host.startswith(":") or host.endswith(":"):
        raise UsageError(f"--device ssh needs USER@HOST[:PORT], like ssh:pi@raspberrypi.local (got 'ssh:{arg}'); "
                         f"forms: {FORMS}")
    from effai.device_bench.runners.ssh import SshRunner

    return SshRunner(arg, cfg)


RUNNERS: Registry[Callable[[str, BenchConfig], Runner]] = Registry("device")
RUNNERS.register("host", _host)
RUNNERS.register("adb", _adb)
RUNNERS.register("ssh", _ssh)


def parse_spec(spec: str) -> tuple[str, str]:
    """("host" | "adb" | "ssh", the rest after the first colon); UsageError listing the forms otherwise."""
    kind, _, arg = spec.strip().partition(":")
    if kind not in RUNNERS:
        raise UsageError(f"unknown --device '{spec}'; use one of: {FORMS}")
    return kind, arg


def open_runner(spec: str, cfg: BenchConfig) -> Runner:
    """The runner for a --device spec: "host", "adb:SERIAL" or "ssh:USER@HOST[:PORT]"."""
    kind, arg = parse_spec(spec)
    return RUNNERS.get(kind)(arg, cfg)


def timings_from_events(events: list[dict[str, Any]], threads: int, warmup: int) -> Timings | None:
    """Timings from remote_runner's JSON-line events (complete or cut short); None before the model loaded.
    Shared by the host and ssh runners, which both speak remote_runner's protocol."""
    load = next((e for e in events if e.get("event") == "load"), None)
    if load is None:
        return None
    first = next((e for e in events if e.get("event") == "first"), {})
    start = next((e for e in events if e.get("event") == "start"), {})
    end = next((e for e in events if e.get("event") == "end"), {})
    hello = next((e for e in events if e.get("event") == "hello"), None)
    samples = [float(e["ms"]) for e in sorted((e for e in events if e.get("event") == "iter"), key=lambda e: e["i"])]
    extra: dict[str, Any] = {"complete": bool(end)}
    if "import_ms" in load:
        extra["import_ms"] = float(load["import_ms"])
    if hello:
        extra["hello"] = {k: v for k, v in hello.items() if k != "event"}
    return Timings(runtime=str(load.get("runtime", "")), runtime_version=str(load.get("runtime_version", "")),
                   threads=threads, load_ms=float(load.get("ms", 0.0)), first_ms=float(first.get("ms", 0.0)),
                   samples_ms=samples, warmup=warmup,
                   window_s=(float(start.get("t", 0.0)), float(end.get("t", start.get("t", 0.0)))), extra=extra)
