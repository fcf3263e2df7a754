"""`effai benchmark MODEL`: export, check and time every target x precision in one table (Ultralytics' `yolo
benchmark` for the four mobile formats). Runtimes this machine lacks are rows with the reason, not failures."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail, parse_targets, progress_printer
from effai.errors import EffaiError, UsageError


def benchmark_cmd(
    model: Annotated[str, typer.Argument(help="Zoo or timm model name, or an effai checkpoint (.safetensors).")],
    targets: Annotated[str, typer.Option("--targets", "-t", help="Comma list of targets, or all.")] = "all",
    quantize: Annotated[Optional[str], typer.Option("--quantize", "-q", help="Comma list of precisions (fp32,int8,"
                                                    "...); a target that does not take one is a row saying why. "
                                                    "Default: each target's default.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint for a model given by name.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size (default: the card's).")] = None,
    threads: Annotated[int, typer.Option(help="Runtime threads for the timing.")] = 2,
    runs: Annotated[int, typer.Option(help="Timed runs per artifact.")] = 50,
    eval_data: Annotated[str, typer.Option("--eval", help="Top-1 data: auto (the card's own set), digits, a folder, "
                                           "an .npz, or none.")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the artifacts and benchmark.json go.")] =
        Path("effai_benchmark"),
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL to every target x precision, check parity and top-1 in each runtime, time each artifact here,
    and print one table (MB, parity, top-1, median / p90 ms, ratio to the fastest)."""
    from effai import zoo
    from effai.export.artifact_dir import artifact_name
    from effai.export.pipeline import ExportConfig, try_export
    from effai.export.plan import plan

    ui = console.err()
    try:
        if threads < 1 or runs < 1:
            raise UsageError("--threads and --runs must be >= 1")
        skipped: dict[str, str] = {}
        names = parse_targets(targets, skipped)
        precs = [p.strip() for p in (quantize or "").split(",") if p.strip()] or [None]
        plans = [plan(t, p) for t in names for p in precs]                 # unknown names: a usage error now
        if model.endswith(".safetensors") or Path(model).is_dir():
            path = Path(model) / "model.safetensors" if Path(model).is_dir() else Path(model)
            loaded = zoo.create(weights=path)
        else:
            loaded = zoo.create(model, weights=weights)
    except EffaiError as e:
        fail(e, as_json)
    rows: list[dict[str, Any]] = [{"target": t, "precision": None, "status": "skipped", "reason": why}
                                  for t, why in skipped.items()]
    timed: list[tuple[dict[str, Any], Path]] = []
    for p in plans:
        row: dict[str, Any] = {"target": p.target, "precision": p.precision}
        rows.append(row)
        if not p.ok:
            row.update(status="skipped", reason=p.reason)
            continue
        c, h, w = loaded.card.input_size
        shape = (1, c, input_size or h, input_size or w)
        dest = out / artifact_name(loaded, p.target, p.precision, shape)
        cfg = ExportConfig(target=p.target, precision=p.precision, input_size=input_size, out=dest, eval=eval_data,
                           force=True)
        o = try_export(loaded, cfg, progress=None if as_json else progress_printer(ui, f"{p.target} {p.precision}"))
        if o.result is None:
            row.update(status="export-failed", reason=str(o.error))
            continue
        m = o.result.manifest
        acc = m.get("accuracy") or {}
        row.update(status="fail" if o.error else "exported", dir=str(dest), parity=m["parity"]["status"],
                   mb=round(sum(f["bytes"] for f in m["files"] if f["path"].startswith(m["model_file"])) / 1e6, 3),
                   top1=(acc.get("artifact") or {}).get("top1"), torch_top1=(acc.get("torch") or {}).get("top1"))
        if o.error is not None:
            row["reason"] = str(o.error)
        why_not = _why_no_runtime(p.target)
        if why_not:
            row.update(status="not-timed", reason=why_not)
        else:
            timed.append((row, dest))
    if timed:
        _time(timed, threads, runs, out, ui, as_json)
    fastest = min((r["median_ms"] for r in rows if r.get("median_ms")), default=None)
    for r in rows:
        if r.get("median_ms") and fastest:
            r["x_fastest"] = round(r["median_ms"] / fastest, 2)
    if not as_json:
        _table(rows, loaded.card.name, threads)
    failed = [r for r in rows if r["status"] in ("export-failed", "fail")]
    summary = {"ok": not failed, "model": loaded.card.name, "threads": threads, "rows": rows,
               "report": str(out / "benchmark.json") if timed else None}
    if failed:
        summary["error"] = "; ".join(f"{r['target']} {r['precision']}: {r.get('reason', r['status'])}"[:300]
                                     for r in failed)
        summary["exit_code"] = 1
    console.json_line(summary)
    if failed:
        raise typer.Exit(1)


def _why_no_runtime(target: str) -> str | None:
    """Why this host cannot time `target`'s artifacts (None: it can)."""
    if target == "coreml" and platform.system() != "Darwin":
        return "Core ML runtime needs macOS (the package was exported and checked structurally)"
    return None


def _time(timed: list[tuple[dict[str, Any], Path]], threads: int, runs: int, out: Path, ui: Any,
          as_json: bool) -> None:
    from effai.device_bench.base import BenchConfig
    from effai.device_bench.bench import run_bench

    cfg = BenchConfig(threads=(threads,), runs=runs, warmup=5, cooldown_s=0.5, idle_s=0.0, energy="none")
    if not as_json:
        ui.print(f"timing {len(timed)} artifact(s) at {threads} thread(s), {runs} runs each")
    report = out / "benchmark.json"
    if report.exists():
        report.unlink()            # this run's numbers only (bench appends to an earlier report)
    result = run_bench([d for _, d in timed], "host", cfg, report)
    by_dir = {str(Path(r.artifact.get("path", "")).resolve()): r for r in result.records}   # records: absolute
    for row, d in timed:
        rec = by_dir.get(str(Path(d).resolve()))
        if rec is None or rec.status != "ok":
            row.update(status="time-failed", reason=(rec.error if rec is not None else "not measured"))
            continue
        row.update(status="timed", runtime=rec.runtime, median_ms=round(rec.stats["median"], 3),
                   p90_ms=round(rec.stats["p90"], 3))


def _table(rows: list[dict[str, Any]], model: str, threads: int) -> None:
    from rich.table import Table

    table = Table(title=f"effai benchmark {model} (ms, {threads} thread{'s' if threads > 1 else ''})")
    for col in ("target", "prec", "MB", "parity", "top-1", "median", "p90", "x best"):
        table.add_column(col, justify="right" if col in ("MB", "median", "p90", "x best") else "left", no_wrap=True)
    notes: list[str] = []
    for r in rows:
        f = (lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else "-")
        mark = ""
        if r["status"] != "timed" and r.get("reason"):
            if r["reason"] not in notes:
                notes.append(r["reason"])
            mark = f" ({notes.index(r['reason']) + 1})"
        table.add_row(r["target"] + mark, r.get("precision") or "-", f("mb", "{:.2f}"), r.get("parity", "-"),
                      f("top1", "{:.2%}"), f("median_ms", "{:.2f}"), f("p90_ms", "{:.2f}"), f("x_fastest", "{:.2f}"))
    console.out().print(table)
    for i, n in enumerate(notes, 1):
        console.out().print(f"({i}) {n}")


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark_cmd)
