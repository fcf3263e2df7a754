"""The background sampler every meter shares: read one value every `period_s` between start(fs) and stop().

A meter subclasses SampledMeter and supplies `probe(fs)`, `prepare(fs)` and `sample(fs) -> float | None` (watts for
kind "power", cumulative joules for kind "energy"). Each reading is stamped halfway through the read and the Trace's
period is the mean achieved interval (docs/bench.md, "effai/device_bench/meters/sampling.py").
"""

from __future__ import annotations

import threading
import time

from effai.device_bench.base import DeviceFS, Trace
from effai.errors import EffaiError


class SampledMeter:
    """Base of all meters: a sampling thread around `sample(fs)`. Subclasses set name, kind, period_s."""

    name = "?"
    kind = "power"          # "power" (W) | "energy" (cumulative J, unwrapped)
    period_s = 0.05

    def __init__(self, period_s: float | None = None) -> None:
        if period_s is not None:
            self.period_s = float(period_s)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._times: list[float] = []
        self._values: list[float] = []
        self._misses = 0
        self._error: str | None = None
        self._fs: DeviceFS | None = None
        self.caveats: list[str] = []

    # -- what subclasses provide ---------------------------------------------------------------------------------
    def probe(self, fs: DeviceFS) -> str | None:  # pragma: no cover - every meter overrides
        raise NotImplementedError

    def prepare(self, fs: DeviceFS) -> None:
        """Resolve paths and calibrate before sampling starts (default: nothing)."""

    def sample(self, fs: DeviceFS) -> float | None:  # pragma: no cover - every meter overrides
        raise NotImplementedError

    def finish(self, trace: Trace) -> None:
        """Add meter-specific caveats once sampling stopped (default: nothing)."""

    # -- the sampler ---------------------------------------------------------------------------------------------
    def _read_once(self, fs: DeviceFS) -> None:
        t0 = time.time()
        try:
            value = self.sample(fs)
        except Exception as e:  # a device read failing mid-run: keep the samples so far, say why
            value = None
            self._error = f"{type(e).__name__}: {e}"
        t1 = time.time()
        if value is None:
            self._misses += 1
            return
        self._times.append((t0 + t1) / 2)
        self._values.append(float(value))

    def _loop(self, fs: DeviceFS) -> None:
        next_t = time.monotonic() + self.period_s
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            self._read_once(fs)
            next_t += self.period_s
            now = time.monotonic()
            if next_t < now:            # reads slower than the period: do not try to catch up in a burst
                next_t = now

    def start(self, fs: DeviceFS) -> None:
        """Prepare, take one reading at once (so the trace starts at start()), then sample in a daemon thread."""
        if self._thread is not None:
            raise EffaiError(f"energy meter {self.name} started twice; stop() it first")
        self._times, self._values, self._misses, self._error = [], [], 0, None
        self.caveats = []
        self._stop.clear()
        self._fs = fs
        self.prepare(fs)
        self._read_once(fs)
        self._thread = threading.Thread(target=self._loop, args=(fs,), name=f"effai-meter-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> Trace:
        """Stop the thread, take one last reading (the timed window ended before stop(), so it brackets the
        window) and return everything recorded, with caveats for failed reads and a slow achieved period."""
        if self._thread is None:
            raise EffaiError(f"energy meter {self.name} stopped before start()")
        self._stop.set()
        self._thread.join(timeout=max(5.0, 4 * self.period_s))
        self._thread = None
        self._read_once(self._fs)
        times, values = list(self._times), list(self._values)
        period = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else self.period_s
        trace = Trace(kind=self.kind, times=times, values=values, period_s=period, caveats=list(self.caveats))
        if self._misses:
            why = f" (last error: {self._error})" if self._error else ""
            trace.caveats.append(f"{self._misses} of {self._misses + len(times)} {self.name} readings failed{why}")
        if period > 1.5 * self.period_s:
            trace.caveats.append(f"sampled every {period * 1000:.0f} ms, slower than the requested "
                                 f"{self.period_s * 1000:.0f} ms (slow device reads)")
        self.finish(trace)
        return trace
