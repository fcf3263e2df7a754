"""Parsers for what the on-device benchmark tools print, in their real formats (the adb runner runs them).

LiteRT `benchmark_model` (tflite/tools/benchmark/benchmark_model.cc; tsl/util/stats_calculator.h) prints only
aggregates, in microseconds. ExecuTorch `executor_runner` (examples/portable/executor_runner/executor_runner.cpp;
log format of runtime/platform/default/posix.cpp) prints one line per iteration, older builds only the total.
Sample output: docs/bench.md, "effai/device_bench/runners/tool_output.py".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


class ToolOutputError(ValueError):
    """A tool's output had none of the lines the parser needs; the message shows the last lines it printed."""


def tail(text: str, n: int = 10) -> str:
    """The last n non-empty lines, joined with ' | ' so an error message stays one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def to_float(text: str) -> float:
    """A number as the tools print it: 12, 12.5, 1.2e+03, 3.4E-05."""
    return float(text)


@dataclass
class ToolResult:
    """What one tool run reported. Times in ms. `per_iteration` says whether samples_ms are real per-run timings;
    when False, samples_ms is empty and `aggregate` holds what the tool printed (count, avg, min, max, std, ...)."""

    tool: str
    load_ms: float | None = None
    first_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    per_iteration: bool = False
    aggregate: dict[str, float] = field(default_factory=dict)
    warmup_aggregate: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    complete: bool = False


# ---------------------------------------------------------------------------------------------- benchmark_model

_LOG_PREFIX = re.compile(r"^(?:INFO|WARN|WARNING|ERROR|VERBOSE|FATAL):\s*")
_STAT_LINE = re.compile(r"\bcount=(\d+)\b(.*)$")
_KV = re.compile(rf"(\w+)=({NUM})")
_TIMINGS = re.compile(r"Inference timings in us:\s*(.*)$")
_INIT = re.compile(rf"Initialized session in ({NUM})\s*ms")
_RUNNING = re.compile(r"Running benchmark for at least")


def parse_stat(text: str) -> dict[str, float]:
    """'count=50 first=20854 curr=20737 min=20619 max=21067 avg=20764.7 std=85' (us) -> {count, first_ms, ...}.
    The 'count=N curr=X(all same)' and 'count=0' forms are handled too."""
    m = _STAT_LINE.search(text)
    if not m:
        return {}
    out: dict[str, float] = {"count": float(int(m.group(1)))}
    for key, val in _KV.findall(m.group(2)):
        out[f"{key}_ms"] = to_float(val) / 1000.0
    if "(all same)" in m.group(2) or (out["count"] == 1 and "curr_ms" in out and "avg_ms" not in out):
        # All runs took the same time: the tool prints only curr; min, max and avg equal it, std is 0.
        c = out["curr_ms"]
        out.update(min_ms=c, max_ms=c, avg_ms=c, std_ms=0.0)
        out.setdefault("first_ms", c)
    return out


def parse_benchmark_model(text: str, complete: bool = True) -> ToolResult:
    """Parse `benchmark_model` output. With complete=True, output lacking the timed run's stat line raises
    ToolOutputError (showing the last lines); with complete=False (a run cut short) whatever was printed is kept."""
    res = ToolResult(tool="benchmark_model")
    stats: list[dict[str, float]] = []
    expect_stat = False
    for raw in text.splitlines():
        line = _LOG_PREFIX.sub("", raw.strip())
        if raw.strip().startswith(("ERROR:", "FATAL:")):
            res.errors.append(line)
        if _RUNNING.search(line):
            expect_stat = True
            continue
        if expect_stat and _STAT_LINE.search(line):
            stats.append(parse_stat(line))
            expect_stat = False
            continue
        if m := _INIT.search(line):
            res.load_ms = to_float(m.group(1))
        if m := _TIMINGS.search(line):
            fields = dict(re.findall(rf"([A-Za-z][A-Za-z ()]*?):\s*({NUM})", m.group(1)))
            fields = {k.strip(): to_float(v) / 1000.0 for k, v in fields.items()}
            if "Init" in fields:
                res.load_ms = fields["Init"]
            if "First inference" in fields:
                res.first_ms = fields["First inference"]
            res.complete = True
    if len(stats) >= 2:
        res.warmup_aggregate, res.aggregate = stats[0], stats[-1]
    elif len(stats) == 1:
        res.warmup_aggregate = stats[0]
    if res.first_ms is None and res.warmup_aggregate.get("first_ms") is not None:
        res.first_ms = res.warmup_aggregate["first_ms"]
    if complete and (not res.aggregate or res.aggregate.get("count", 0) == 0):
        raise ToolOutputError(f"benchmark_model printed no timed-run statistics (count=... avg=...); "
                              f"last lines: {tail(text)}")
    return res


# ---------------------------------------------------------------------------------------------- executor_runner

_ET_LOG = re.compile(r"^([DIEF])\s+(?:\d+:\d\d:\d\d\.\d+\s+)?\[?executorch:([^:\]]+):(\d+)\]\s?(.*)$")
_ET_LOADED = re.compile(rf"Model loaded in ({NUM})\s*ms")
_ET_ITER = re.compile(rf"Iteration (\d+) of (\d+):\s*({NUM})\s*ms")
_ET_DONE = re.compile(rf"Model executed successfully (\d+) time\(s\) in ({NUM})\s*ms")


def parse_executor_runner(text: str, complete: bool = True) -> ToolResult:
    """Parse `executor_runner` output: per-iteration times when it prints them (samples_ms holds every execution,
    the first included; the runner splits first / warmup / timed), else the total over N executions."""
    res = ToolResult(tool="executor_runner")
    iters: dict[int, float] = {}
    for raw in text.splitlines():
        m = _ET_LOG.match(raw.strip())
        if not m:
            continue
        level, msg = m.group(1), m.group(4)
        if level in ("E", "F"):
            res.errors.append(msg)
        if mm := _ET_LOADED.search(msg):
            res.load_ms = to_float(mm.group(1))
        elif mm := _ET_ITER.search(msg):
            iters[int(mm.group(1))] = to_float(mm.group(3))
        elif mm := _ET_DONE.search(msg):
            n, total = int(mm.group(1)), to_float(mm.group(2))
            res.aggregate = {"count": float(n), "total_ms": total, "avg_ms": total / n if n else float("nan")}
            res.complete = True
    if iters:
        res.samples_ms = [iters[i] for i in sorted(iters)]
        res.per_iteration = True
        res.first_ms = res.samples_ms[0]
    if complete and not res.complete:
        raise ToolOutputError(f"executor_runner did not report 'Model executed successfully N time(s)'"
                              f"{' (errors: ' + '; '.join(res.errors[:3]) + ')' if res.errors else ''}; "
                              f"last lines: {tail(text)}")
    return res
