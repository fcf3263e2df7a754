"""What every runner shares: `RunnerError` (a device failed mid-run, with the timings measured so far) and the
parser of remote_runner's JSON-line events."""

from __future__ import annotations

from typing import Any

from effai.device_bench.base import Timings
from effai.errors import EffaiError


class RunnerError(EffaiError):
    """The device failed during a run (disconnect, crash, unparsable output). `partial` holds what was measured
    before the failure, or None; bench keeps it in a record with status "error"."""

    def __init__(self, message: str, partial: Timings | None = None) -> None:
        super().__init__(message)
        self.partial = partial


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


class RuntimeMissing(RunnerError):
    """The artifact's runtime is not on this device (Core ML off macOS, a runtime not installed): the record is
    "skipped" with the reason, not a failure of the run."""
