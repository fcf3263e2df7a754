"""`effai bench`: latency and energy of exported artifacts on the host, Android phones (adb) and boards (ssh).

Registered on the app by effai/cli/app.py (`register(app)`); the measurement itself is effai.device_bench.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError



def parse_threads(text: str) -> tuple[int, ...]:
    """--threads "1,4" -> (1, 4); UsageError for anything that is not a comma list of positive integers."""
    try:
        threads = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UsageError(f"--threads '{text}' must be a comma list of thread counts, like 1,4") from None
    if not threads or min(threads) < 1:
        raise UsageError(f"--threads '{text}' must be a comma list of thread counts >= 1, like 1,4")
    return tuple(dict.fromkeys(threads))


def bench_cmd(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories written by effai export, or plain "
                                                    ".onnx/.tflite/.pte files (.mlpackage: macOS only); a plain "
                                                    "file has no manifest: parity and accuracy not checked.")],
    device: Annotated[str, typer.Option("--device", "-d", help="host | adb:SERIAL | ssh:USER@HOST[:PORT]")] = "host",
    threads: Annotated[str, typer.Option(help="Thread counts to sweep, a comma list like 1,4.")] = "1",
    runs: Annotated[int, typer.Option(help="Timed iterations (at least this many with --min-seconds).")] = 100,
    min_seconds: Annotated[Optional[float], typer.Option(help="Keep timing until this many seconds passed.")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed iterations after the first inference.")] = 10,
    cooldown: Annotated[float, typer.Option(help="Seconds to rest between measurements (heat, turbo budgets).")] = 2.0,
    idle: Annotated[float, typer.Option(help="Seconds of idle power measured before each timed window "
                                        "(subtracted from energy).")] = 1.0,
    energy: Annotated[str, typer.Option(help="auto | none | rapl | android | jetson | rpi | apple")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON report, rewritten after every record "
                                      "(appended to when it is an earlier report).")] = Path("bench.json"),
    plot_png: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: latency distributions, energy "
                                                     "bars.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="An earlier report to compare with (exit 1 on a "
                                                     "regression).")] = None,
    fail_on: Annotated[Optional[str], typer.Option(help="Regression rules for --baseline: metric:+PCT%, comma "
                                                   "separated (latency, p90, p99, energy, first, load; end a "
                                                   "rule with ! to fail even within noise); default "
                                                   "latency:+5%,energy:+5%.")] = None,
    trust_new_host: Annotated[bool, typer.Option("--trust-new-host", help="ssh: accept and store an unknown host "
                                                 "key (default: known_hosts must have it).")] = False,
    runner_binary: Annotated[Optional[Path], typer.Option(help="adb: executor_runner or benchmark_model built for "
                                                          "the phone, or a directory holding both.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Plain files: [NAME=]D,D,... "
                                                             "for an input with dynamic dims (repeatable): ONNX "
                                                             "fills them, LiteRT resizes the dims a .tflite marks "
                                                             "-1; .pte and .mlpackage sizes are fixed in the file.")] = None,
    record: Annotated[Optional[Path], typer.Option(help="A bundle (effai bundle pack) to append these results to: its "
                                                   "perf.json and MODEL_CARD.md perf table.")] = None,
    record_key: Annotated[Optional[Path], typer.Option(help="With --record: re-sign the bundle with this private "
                                                       "key (else its now-stale signature is deleted: the "
                                                       "bundle becomes unsigned). Invalid or removed "
                                                       "signatures are refused.")] = None,
    sr_size: Annotated[Optional[str], typer.Option(help="SR artifacts (effai sr export): LR image size WxH "
                                                   "(default: one trained tile).")] = None,
    sr_steps: Annotated[int, typer.Option(help="SR artifacts: DDIM sampler steps per tile.")] = 8,
    profile: Annotated[bool, typer.Option("--profile", help="Also profile each artifact per operator (host only): "
                                          "ExecuTorch ETDump/XNNPACK events, LiteRT operator isolation, "
                                          "onnxruntime's trace; time, share, GFLOP/s vs the host's measured "
                                          "matmul peak, saved in the report and plotted (docs/profiling.md).")] = False,
    profile_runs: Annotated[int, typer.Option(help="--profile: profiled runs per artifact (median).")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Latency (and energy where a meter is readable) of artifacts on this host, a phone (adb) or a board (ssh).
    A generation artifact (effai export of ADEM-VL / an LM): time to first token, prefill, decode tokens/s, memory;
    a DeLVM artifact (effai delvm export): ms per generated image and image tokens/s; an SR artifact (effai sr
    export): ms per image at --sr-size and --sr-steps."""
    from effai.cli.sr import bench_dispatch as sr_bench   # SR: ms per image at --sr-size, --sr-steps

    if sr_bench(artifacts, sr_size, sr_steps, runs, warmup,
                {"--device": device != "host", "--threads": threads != "1", "--min-seconds": min_seconds,
                 "--baseline": baseline, "--fail-on": fail_on, "--plot": plot_png, "--record": record,
                 "--record-key": record_key, "--input-shape": input_shape, "--runner-binary": runner_binary,
                 "--profile": profile}, as_json):
        return
    from effai.cli.generate import bench_dispatch

    if bench_dispatch(artifacts, runs, warmup, {"--device": device != "host", "--threads": threads != "1",
                                                "--min-seconds": min_seconds, "--baseline": baseline,
                                                "--fail-on": fail_on, "--plot": plot_png, "--record": record,
                                                "--record-key": record_key, "--input-shape": input_shape,
                                                "--runner-binary": runner_binary, "--profile": profile}, as_json):
        return
    from effai.device_bench import report
    from effai.device_bench.base import BenchConfig
    from effai.device_bench.bench import run_bench

    ui = console.err()
    try:
        cfg = BenchConfig(threads=parse_threads(threads), warmup=warmup, runs=runs, min_seconds=min_seconds,
                          cooldown_s=cooldown, idle_s=idle, energy=energy, trust_new_host=trust_new_host,
                          runner_binary=str(runner_binary) if runner_binary else None, seed=seed)
        if fail_on is not None and baseline is None:
            raise UsageError("--fail-on needs --baseline FILE (an earlier effai bench report) to compare with")
        rules = base_records = None
        if baseline is not None:
            from effai.device_bench import baseline as baseline_mod

            rules = baseline_mod.parse_fail_on(fail_on or "latency:+5%,energy:+5%")
            _, base_records = report.load(baseline)
        from effai.device_bench.artifact import parse_input_shapes

        shapes = parse_input_shapes(input_shape or [])
        if plot_png is not None and plot_png.suffix.lower() != ".png":
            raise UsageError(f"--plot {plot_png} must be a .png path")
        if profile:
            precheck_profile(artifacts, device, profile_runs)
    except EffaiError as e:
        fail(e, as_json)

    def on_start(art: Any, n: int) -> None:
        if not as_json:
            ui.print(f"[dim]… {art.model_name} {art.target}/{art.precision} threads={n} on {device}[/]")

    measured: list[Any] = []   # this run's records (the report may also hold an earlier run's)

    def on_record(rec: Any) -> None:
        measured.append(rec)
        if as_json:
            return
        s = rec.stats
        if rec.status == "ok":
            note = " [dim](plain model file: no manifest, parity and accuracy not checked)[/]" if rec.artifact.get(
                "plain_file") else ""
            ui.print(f"[green]✓[/] {rec.artifact['model']} {rec.artifact['target']}/{rec.artifact['precision']} "
                     f"t={rec.threads}{note}: median {s['median']:.3f} ms, p90 {s['p90']:.3f} ms ({rec.runs} runs, "
                     f"first {rec.first_ms:.2f} ms, load {rec.load_ms:.1f} ms)")
        else:
            ui.print(f"[bold red]✗[/] {rec.artifact['model']} {rec.artifact['target']} t={rec.threads}: {rec.error}")

    if record_key is not None and record is None:
        fail(UsageError("--record-key needs --record BUNDLE (the bundle to append the results to)"), as_json)
    if record is not None:
        from effai.bundle import perf
        from effai.device_bench import artifact as artifact_mod

        try:   # refuse a bad bundle, key or artifact now, not after the measurements
            plain = [str(a) for a in artifacts if artifact_mod.is_plain_file(a)]
            if plain:
                raise UsageError(f"--record takes artifact directories only ({plain[0]} is a plain model file with "
                                 "no manifest); export it with effai export and bench that directory")
            perf.precheck(record, [artifact_mod.load(a) for a in artifacts], record_key)
        except EffaiError as e:
            fail(e, as_json)
    meta = {"command": ["effai", *sys.argv[1:]]}
    try:
        result = run_bench(artifacts, device, cfg, out, on_record, meta=meta, on_start=on_start,
                           input_shapes=shapes)
    except KeyboardInterrupt:
        records = measured
        if not as_json and records:
            console.out().print(report.table(records, width=console.out().width))
        ui.print(f"[red]interrupted[/]; the {len(records)} record(s) measured so far are in {out} "
                 "(status interrupted)")
        console.json_line({"ok": False, "interrupted": True, "report": str(out), "records": len(records),
                           "error": "interrupted", "exit_code": 130})
        raise typer.Exit(130)
    except EffaiError as e:
        fail(e, as_json, {"report": str(out)} if out.exists() else None)
    for n in result.notices:
        if not as_json:
            ui.print(f"[yellow]! {n}[/]")
    records = result.records
    summary: dict[str, Any] = {"ok": not result.failed, "report": str(out), "device": result.device.get("name"),
                               "energy": result.energy_note, "records": [_bench_row(r) for r in records],
                               "skipped": [{"artifact": r.artifact.get("path"), "reason": r.error}
                                           for r in result.skipped]}
    if not as_json:
        console.out().print(report.table(records, width=console.out().width))
        ui.print(f"[dim]energy: {result.energy_note}[/]")
        for r in result.skipped:
            ui.print(f"[yellow]! skipped {r.artifact.get('path')}: {r.error}[/]")
        ui.print(f"[green]✓[/] report {out}")
    code = 0 if not result.failed else 1
    if result.failed:
        summary["error"] = f"{len(result.failed)} of {len(records)} measurement(s) failed: {result.failed[0].error}"
    if plot_png is not None:
        from effai.device_bench.plot import plot

        try:
            summary["plot"] = str(plot(records, plot_png))
            if not as_json:
                ui.print(f"[green]✓[/] plot {plot_png}")
        except (OSError, ValueError) as e:
            summary["plot_error"] = f"cannot write the plot {plot_png}: {e}"
            ui.print(f"[yellow]! {summary['plot_error']}[/]")
    if profile:
        try:
            summary["profiles"] = run_profiles(artifacts, records, out, cfg, profile_runs, shapes, as_json)
        except EffaiError as e:
            fail(e, as_json, {"report": str(out)})
    if rules is not None:
        from effai.device_bench import baseline as baseline_mod

        comparison = baseline_mod.compare(records, base_records, rules)
        if not as_json:
            (console.out() if comparison.ok else ui).print(comparison.render(), markup=False, highlight=False)
        summary["baseline"] = {"file": str(baseline), "ok": comparison.ok,
                               "regressions": [r.to_dict() for r in comparison.regressions]}
        if not comparison.ok:
            code = 1
            summary["ok"] = False
            summary["error"] = (f"{len(comparison.regressions)} regression(s) against {baseline}: "
                                + comparison.regressions[0].line())
    if record is not None:
        from effai.bundle import perf

        try:
            rec = perf.record(record, [r for r in records if r.status == "ok"], sign_key=record_key)
        except EffaiError as e:
            fail(e, as_json, {"report": str(out)})
        summary["recorded"] = rec.to_dict()
        if not as_json:
            ui.print(f"[green]✓[/] recorded {rec.added} result(s) in {record}/perf.json (signature {rec.signature})")
            for n in rec.notes:
                ui.print(f"[yellow]! {n}[/]")
    if code:
        summary["exit_code"] = code
    console.json_line(summary)
    if code:
        raise typer.Exit(code)


def precheck_profile(artifacts: list[Path], device: str, runs: int) -> None:
    """UsageError before any timing when --profile cannot run: not the host, bad --profile-runs, or an artifact
    whose format has no profiler here (Core ML on Linux)."""
    from effai.device_bench import artifact as artifact_mod
    from effai.device_bench.profile import check

    if device.strip() != "host":
        raise UsageError(f"--profile runs on this host only (got --device {device}); drop --device or --profile")
    if runs < 1:
        raise UsageError(f"--profile-runs {runs} must be >= 1")
    for a in artifacts:
        if artifact_mod.is_plain_file(a):
            target = artifact_mod.SUFFIXES.get(Path(a).suffix.lower(), "")
            if not target:
                raise UsageError(f"{a}: unknown model file type '{Path(a).suffix or '(none)'}'; --profile takes "
                                 "artifact directories or .pte/.tflite/.onnx files")
        else:
            target = artifact_mod.load(a, check_hashes=False).target
        check(target, str(a))


def run_profiles(artifacts: list[Path], records: list[Any], out: Path, cfg: Any, runs: int,
                 shapes: dict[str, tuple[int, ...]], as_json: bool) -> list[dict[str, Any]]:
    """Profile every ok record's artifact at its thread count, print the tables, store each profile in its record
    of the report (extra.profile) and plot them next to the report (<out stem>.profile.png)."""
    import json
    import shutil
    import tempfile

    from effai.device_bench import artifact as artifact_mod
    from effai.device_bench import report
    from effai.device_bench.profile import flops_from, peak, profile_artifact, render
    from effai.export.quiet import runtime_quiet

    ui = console.err()
    stage = Path(tempfile.mkdtemp(prefix="effai-profile-"))
    done: list[tuple[Any, Any]] = []
    try:
        arts = [artifact_mod.load_file(a, stage / str(i), shapes) if artifact_mod.is_plain_file(a)
                else artifact_mod.load(a) for i, a in enumerate(artifacts)]
        by_path = {str(a.describe()["path"]): a for a in arts}
        peaks: dict[int, dict[str, Any]] = {}
        # a .pte's XNNPACK events carry no shapes: its FLOPs come from a .tflite of the same model in this run
        model_flops = {a.model_name: flops_from(a.model_file) for a in arts if a.target == "tflite"}
        for rec in records:
            art = by_path.get(str(rec.artifact.get("path")))
            if rec.status != "ok" or art is None:
                continue
            if rec.threads not in peaks:
                if not as_json:
                    ui.print(f"[dim]… host matmul peak at {rec.threads} thread(s) (cached after the first run)[/]")
                with runtime_quiet():
                    peaks[rec.threads] = peak.peak_gflops(rec.threads)
            if not as_json:
                ui.print(f"[dim]… profiling {art.model_name} {art.target}/{art.precision} threads={rec.threads}[/]")
            prof = profile_artifact(art, rec.threads, runs, cfg.warmup, cfg.seed, measured_ms=rec.stats.get("median"),
                                    peak=peaks[rec.threads])
            if prof.flops is None and model_flops.get(art.model_name):
                from dataclasses import replace

                from effai.device_bench.profile.base import roofline

                prof = replace(prof, flops=model_flops[art.model_name],
                               notes=prof.notes + ("model FLOPs counted from the .tflite of the same model in this "
                                                   "run",))
                prof = replace(prof, roofline=roofline(prof, rec.stats.get("median"), peaks[rec.threads]))
            done.append((rec, prof))
            if not as_json:
                label = f"{art.model_name} {art.target}/{art.precision}"
                console.out().print(render.table(prof, label, width=console.out().width))
                ui.print(render.roofline_line(prof))
                for n in prof.notes:
                    ui.print(f"[dim]  {n}[/]")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not done:
        return []
    doc = json.loads(out.read_text(encoding="utf-8"))
    mine = doc["records"][len(doc["records"]) - len(records):]
    for rec, prof in done:
        i = records.index(rec)
        mine[i].setdefault("extra", {})["profile"] = prof.to_dict()
    report.atomic_write_text(out, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    png = out.with_name(out.stem + ".profile.png")
    result = []
    try:
        render.plot([(f"{r.artifact.get('model')} {r.artifact.get('target')}/{r.artifact.get('precision')} "
                      f"t={r.threads}", p) for r, p in done], png)
        if not as_json:
            ui.print(f"[green]✓[/] profile plot {png}")
    except (OSError, ValueError) as e:
        ui.print(f"[yellow]! cannot write the profile plot {png}: {e}[/]")
        png = None
    for rec, prof in done:
        result.append({"model": rec.artifact.get("model"), "target": rec.artifact.get("target"),
                       "precision": rec.artifact.get("precision"), "threads": rec.threads,
                       "runtime": prof.runtime, "total_ms": prof.total_ms, "operators": len(prof.rows),
                       "mapped": prof.mapped, "roofline": prof.roofline, "plot": str(png) if png else None,
                       "top": [{"name": r.name, "kind": r.kind, "module": r.module, "ms": r.time_ms,
                                "share": r.share, "gflops": r.gflops} for r in prof.top(5)]})
    return result


def _bench_row(rec: Any) -> dict[str, Any]:
    s, e = rec.stats, rec.energy
    return {"model": rec.artifact.get("model"), "target": rec.artifact.get("target"),
            "precision": rec.artifact.get("precision"), "path": rec.artifact.get("path"), "threads": rec.threads,
            "status": rec.status, "error": rec.error or None, "runtime": rec.runtime,
            "runtime_version": rec.runtime_version, "runs": rec.runs, "median_ms": s.get("median"),
            "p90_ms": s.get("p90"), "first_ms": rec.first_ms, "load_ms": rec.load_ms,
            "joules_per_inference": e.get("joules_per_inference") if e.get("available") else None,
            "energy": "available" if e.get("available") else e.get("reason"),
            "throttling": rec.throttling.get("verdict")}


def register(app: typer.Typer) -> None:
    """Add `effai bench` to the main typer app."""
    app.command("bench")(bench_cmd)
