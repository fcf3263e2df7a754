"""`effai bench`'s driver: every artifact x thread count on one device, one BenchRecord each, report kept current.

    run_bench(["out/a-tflite", "out/a-onnx"], "host", BenchConfig(threads=(1, 4)), Path("bench.json"))

Each record is appended (report rewritten atomically) before the next measurement; a failing artifact becomes an
"error" record, Ctrl-C an "interrupted" report. Step order: docs/bench.md, "effai/device_bench/bench.py".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from effai.device_bench import artifact as artifact_mod
from effai.device_bench.runners.common import RuntimeMissing
from effai.device_bench.base import BenchConfig, BenchRecord, EnergyReading, Timings
from effai.device_bench.stats import from_aggregate, summarize
from effai.errors import EffaiError, UsageError


@dataclass
class BenchRun:
    """What run_bench measured: the records (in order), where the report is, and how the run ended."""

    records: list[BenchRecord]
    report_path: Path
    status: str                      # complete | interrupted
    device: dict[str, Any]
    energy_note: str = ""            # the meter chosen, or why energy is unavailable
    notices: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[BenchRecord]:
        return [r for r in self.records if r.status == "error"]

    @property
    def skipped(self) -> list[BenchRecord]:
        return [r for r in self.records if r.status == "skipped"]


def check_config(cfg: BenchConfig) -> None:
    """UsageError for settings no measurement can use, before any device is touched."""
    if not cfg.threads or any(int(t) < 1 for t in cfg.threads):
        raise UsageError(f"--threads {','.join(map(str, cfg.threads)) or '(empty)'}: give thread counts >= 1, like 1,4")
    if cfg.runs < 1:
        raise UsageError(f"--runs {cfg.runs} must be >= 1")
    if cfg.warmup < 0:
        raise UsageError(f"--warmup {cfg.warmup} must be >= 0")
    if cfg.min_seconds is not None and cfg.min_seconds < 0:
        raise UsageError(f"--min-seconds {cfg.min_seconds} must be >= 0")
    if cfg.cooldown_s < 0 or cfg.idle_s < 0:
        raise UsageError(f"--cooldown {cfg.cooldown_s} and the idle window {cfg.idle_s} must be >= 0 seconds")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version() -> str:
    from effai.version import __version__

    return __version__


def _energy(meter: Any, trace: Any, timings: Timings | None, idle: tuple[float, float] | None,
            note: str) -> EnergyReading:
    """The energy reading for one measurement, or 'unavailable: why' (never a guess)."""
    if meter is None:
        return EnergyReading.unavailable("none", note)
    if trace is None:
        return EnergyReading.unavailable(meter.name, "the meter recorded nothing (it failed to start or stop)")
    if timings is None or not timings.samples_ms or timings.window_s[1] <= timings.window_s[0]:
        return EnergyReading.unavailable(meter.name, "no timed window to integrate over (the run failed)")
    from effai.device_bench import energy

    return energy.reading(meter.name, trace, timings.window_s, idle, inferences(timings))


def inferences(timings: Timings) -> int:
    """Inferences in the timed window: one per sample, or the tool's own count when it printed only aggregates
    (benchmark_model: one mean stands for `count` runs)."""
    agg = timings.extra.get("aggregate_ms") if timings.extra.get("timing") == "aggregate-only" else None
    return int(agg.get("count") or len(timings.samples_ms)) if agg else len(timings.samples_ms)


def _record(art: artifact_mod.Artifact, device: dict[str, Any], threads: int, cfg: BenchConfig,
            timings: Timings | None, reading: EnergyReading, throttling: dict[str, Any], error: str,
            skipped: bool = False) -> BenchRecord:
    samples = list(timings.samples_ms) if timings else []
    complete = bool(timings) and not error
    extra: dict[str, Any] = {"complete": complete, "requested_runs": cfg.runs, "min_seconds": cfg.min_seconds,
                             "seed": cfg.seed}
    if timings is not None:
        extra["window_s"] = list(timings.window_s)
        extra["runner"] = timings.extra
    nan = float("nan")
    aggregate = timings.extra.get("aggregate_ms") if timings is not None else None
    if timings is not None and timings.extra.get("timing") == "aggregate-only" and aggregate:
        stats = from_aggregate(aggregate)   # the tool printed no per-iteration times: its own summary, not ours
    else:
        stats = summarize(samples)
    return BenchRecord(
        artifact=art.describe(), device=device, runtime=timings.runtime if timings else "",
        runtime_version=timings.runtime_version if timings else "", threads=threads,
        warmup=timings.warmup if timings else cfg.warmup, runs=int(stats.get("n", len(samples))),
        load_ms=timings.load_ms if timings else nan, first_ms=timings.first_ms if timings else nan,
        stats=stats, samples_ms=samples, throttling=throttling,
        energy=dataclasses.asdict(reading), effai_version=_version(), created_at=_now(),
        status="skipped" if skipped else "error" if error else "ok", error=error, extra=extra)


def run_bench(artifact_dirs: Sequence[Path | str], device_spec: str, cfg: BenchConfig, report_path: Path | str,
              on_record: Callable[[BenchRecord], None] | None = None, *, meta: dict[str, Any] | None = None,
              on_start: Callable[[artifact_mod.Artifact, int], None] | None = None,
              sleep: Callable[[float], None] = time.sleep,
              input_shapes: dict[str, tuple[int, ...]] | None = None) -> BenchRun:
    """Benchmark every artifact at every thread count of `cfg` on `device_spec`; see the module docstring.

    Artifacts are all loaded and hash-checked first (UsageError before any device time is spent). `on_record` is
    called after each record is safely in the report; `on_start(artifact, threads)` before each measurement.
    A plain .onnx/.tflite/.pte/.mlpackage is staged with a manifest read from the file (artifact.load_file;
    `input_shapes` fills its dynamic dims) and timed by the same runners; the stage is removed at the end."""
    import shutil
    import tempfile

    check_config(cfg)
    if not artifact_dirs:
        raise UsageError("no artifact directories given; pass one or more directories written by effai export "
                         "or model files (.onnx, .tflite, .pte, .mlpackage)")
    stage = Path(tempfile.mkdtemp(prefix="effai-bench-files-")) if any(
        artifact_mod.is_plain_file(d) for d in artifact_dirs) else None
    try:
        arts = [artifact_mod.load_file(d, stage / str(i), input_shapes) if artifact_mod.is_plain_file(d)
                else artifact_mod.load(d) for i, d in enumerate(artifact_dirs)]
        return _run(arts, artifact_dirs, device_spec, cfg, report_path, on_record, meta, on_start, sleep)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _run(arts: list[artifact_mod.Artifact], artifact_dirs: Sequence[Path | str], device_spec: str, cfg: BenchConfig,
         report_path: Path | str, on_record: Callable[[BenchRecord], None] | None, meta: dict[str, Any] | None,
         on_start: Callable[[artifact_mod.Artifact, int], None] | None, sleep: Callable[[float], None]) -> BenchRun:
    from effai.device_bench import meters, thermal
    from effai.device_bench.report import ReportWriter, check_writable
    from effai.device_bench.runners import RunnerError, open_runner

    check_writable(report_path)   # an unwritable --out is refused before any device is touched
    spec = device_spec.strip()
    runner = open_runner(spec, cfg)
    try:
        device = {"name": spec, **runner.describe()}
        meter, note = meters.choose(cfg.energy, runner.fs)
        writer = ReportWriter(Path(report_path), {
            **(meta or {}), "device": device, "config": dataclasses.asdict(cfg), "energy": note,
            "artifacts": [str(a.describe()["path"]) for a in arts]})
        run = BenchRun(records=writer.records, report_path=Path(report_path), status="running", device=device,
                       energy_note=note, notices=[writer.notice] if writer.notice else [])
        try:
            first = True
            for art in arts:
                for threads in cfg.threads:
                    if not first and cfg.cooldown_s > 0:
                        sleep(cfg.cooldown_s)
                    first = False
                    if on_start is not None:
                        on_start(art, threads)
                    rec = _measure_one(runner, meter, note, art, int(threads), cfg, device, thermal, RunnerError,
                                       sleep)
                    writer.append(rec)
                    if on_record is not None:
                        on_record(rec)
        except KeyboardInterrupt:
            run.status = "interrupted"
            writer.finish("interrupted")
            raise
        run.status = "complete"
        writer.finish("complete")
        return run
    finally:
        runner.close()


def _measure_one(runner: Any, meter: Any, note: str, art: artifact_mod.Artifact, threads: int, cfg: BenchConfig,
                 device: dict[str, Any], thermal: Any, runner_error: type, sleep: Callable[[float], None]
                 ) -> BenchRecord:
    before = thermal.snapshot(runner.fs)
    timings: Timings | None = None
    error = ""
    skipped = False
    trace = None
    idle: tuple[float, float] | None = None
    started = False
    meter_error = ""
    try:
        if meter is not None:
            try:
                meter.start(runner.fs)
                started = True
            except Exception as e:   # a meter that cannot start costs this record its energy, not the matrix
                meter_error = f"the {meter.name} meter failed to start: {type(e).__name__}: {e}"
        if started:
            if cfg.idle_s > 0:
                t0 = time.time()
                sleep(cfg.idle_s)
                idle = (t0, time.time())
        try:
            with _quiet(runner):
                timings = runner.run(art, threads, cfg)
        except RuntimeMissing as e:   # not this device's runtime: a skipped record with the reason, not a failure
            error, skipped = str(e), True
        except runner_error as e:
            timings, error = e.partial, str(e) + (" (partial samples kept)" if e.partial and e.partial.samples_ms
                                                  else "")
        except EffaiError as e:   # missing runtime, load failure: this artifact only; the matrix goes on
            error = str(e)
    finally:
        if started:
            try:
                trace = meter.stop()
            except Exception as e:
                meter_error = f"the {meter.name} meter failed to stop: {type(e).__name__}: {e}"
    reading = (EnergyReading.unavailable(meter.name, meter_error) if meter_error
               else _energy(meter, trace, timings, idle, note))
    after = thermal.snapshot(runner.fs)
    samples = timings.samples_ms if timings else []
    throttling = thermal.verdict(before, after, list(samples))
    throttling = {**throttling, "readings": {"before": before, "after": after}}
    if isinstance(art, artifact_mod.PlainArtifact):   # name the user's file, not its temporary stage
        error = error.replace(str(art.model_file), str(art.source)).replace(str(art.dir), str(art.source.parent))
    return _record(art, device, threads, cfg, timings, reading, throttling, error, skipped)


def _quiet(runner: Any) -> Any:
    """On the host the runtimes run in this process: their C++ chatter (XNNPACK's cpuinfo and delegate lines) and
    import warnings are dropped, not printed over bench's table. Remote runners parse their own output."""
    import contextlib

    from effai.export.quiet import runtime_quiet

    return runtime_quiet() if getattr(runner, "name", "") == "host" else contextlib.nullcontext()


def exit_code(run: BenchRun) -> int:
    """0 when every record is ok, 1 when any failed."""
    return 1 if run.failed else 0

