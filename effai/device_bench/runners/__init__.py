"""Where artifacts run: `host` (this Python), `adb:SERIAL` (an Android phone), `ssh:USER@HOST[:PORT]` (a board).

`open_runner(spec, cfg)` parses the --device spec and builds the runner; the adb and ssh runners (and their
paramiko / subprocess machinery) are imported only when asked for, so `effai bench --device host` loads neither.
Every runner follows base.Runner and raises RunnerError when the device fails mid-run, carrying the timings
measured so far so the report keeps them (marked incomplete).
"""

from __future__ import annotations

from collections.abc import Callable

from effai.device_bench.base import BenchConfig, Runner
from effai.device_bench.runners.common import RunnerError, timings_from_events  # noqa: F401 (re-exported)
from effai.errors import UsageError
from effai.registry import Registry

FORMS = "host | adb:SERIAL | ssh:USER@HOST[:PORT]"


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
