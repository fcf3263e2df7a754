"""The `host` runner: artifacts timed in this Python process by remote_runner.measure, the same code a board runs.

Running in-process (not in a child Python) means no interpreter start-up per artifact and the timed loop is the
one bench_overhead.py compares against a bare loop. Runtimes are imported by measure() only for the artifact's
target, so benchmarking a .tflite never loads torch; only ExecuTorch's Python API needs it.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from effai.device_bench import remote_runner
from effai.device_bench.base import BenchConfig, Timings
from effai.device_bench.hostfs import LocalFS
from effai.device_bench.runners.common import RunnerError, RuntimeMissing, timings_from_events
from effai.errors import EffaiError, UsageError


class HostRunner:
    """Runner for this machine (base.Runner). `fs` is the host's sysfs (under EFFAI_SYSFS_ROOT in tests)."""

    name = "host"

    def __init__(self, cfg: BenchConfig | None = None) -> None:
        self.cfg = cfg or BenchConfig()
        self.fs = LocalFS()

    def describe(self) -> dict[str, Any]:
        """device.describe(fs) (model, CPU, cores, OS, kernel) plus this Python and its installed runtimes."""
        from effai.device_bench import device

        info = dict(device.describe(self.fs))
        info.update({"python": platform.python_version(), "python_executable": sys.executable,
                     "runtimes": remote_runner.installed_runtimes()})
        return info

    def run(self, artifact: Any, threads: int, cfg: BenchConfig) -> Timings:
        """Load, first inference, warmup, timed loop, in this process; errors say what to install or fix."""
        events: list[dict[str, Any]] = []
        try:
            res = remote_runner.measure(artifact.dir, threads, cfg.warmup, cfg.runs, cfg.min_seconds, cfg.seed,
                                        emit=events.append)
        except remote_runner.MeasureError as e:
            if e.kind == "bad-artifact":
                raise UsageError(e.message) from None
            if e.kind == "missing-runtime":
                raise RuntimeMissing(e.message) from None
            if e.kind == "run":
                raise RunnerError(e.message, timings_from_events(events, threads, cfg.warmup)) from None
            raise EffaiError(e.message) from None   # missing runtime (what to pip install), load failure
        return Timings(runtime=res["runtime"], runtime_version=res["runtime_version"], threads=threads,
                       load_ms=res["load_ms"], first_ms=res["first_ms"], samples_ms=res["samples_ms"],
                       warmup=cfg.warmup, window_s=tuple(res["window_s"]), extra={"in_process": True, "import_ms": res["import_ms"]})

    def close(self) -> None:
        """Nothing was copied anywhere; nothing to clean up."""
