"""effai's command line: thin wrappers that parse, call the library, print, and end with one JSON line.

Exit codes: 0 success, 2 bad usage or input, 1 any other failure.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.errors import EffaiError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fold, export and verify compact vision models for phones and edge boards.")
zoo_app = typer.Typer(no_args_is_help=True, help="Model cards: what effai can build and export.")
app.add_typer(zoo_app, name="zoo")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output only (one JSON object).")]


def _fail(e: EffaiError, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    kind = "usage error" if e.exit_code == 2 else "error"
    if not as_json:
        console.err().print(f"[bold red]{kind}:[/] {e}")
    console.json_line({"ok": False, "error": str(e), "exit_code": e.exit_code, **(extra or {})})
    raise typer.Exit(e.exit_code)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--input-shape '{text}' must look like 1x3x224x224") from None
    if len(dims) != 4 or min(dims) < 1:
        raise UsageError(f"--input-shape '{text}' must be 4 positive numbers N x C x H x W, like 1x3x224x224")
    return dims


def _quantize_help() -> str:
    from effai.export.precisions import help_text
    from effai.export.targets import TARGETS

    return ("Precision: fp32/fp16 or a quantization (default fp16 on coreml, fp32 elsewhere). Per target: "
            + help_text({n: t.precisions for n, t in TARGETS.items()}) + ". Meanings: docs/quantization.md.")


QUANTIZE_HELP = _quantize_help()


def _default_precision(target: str) -> str:
    from effai.export.targets import TARGETS

    return TARGETS.get(target).precisions[0]


def check_precision(precision: str, targets: list[str]) -> None:
    """Up front, before any model is loaded: every chosen target must take this precision."""
    from effai.errors import choices_hint
    from effai.export.precisions import PRECISIONS
    from effai.export.targets import TARGETS

    if precision not in PRECISIONS:
        raise UsageError(f"unknown --quantize '{precision}'; {choices_hint(precision, PRECISIONS.names())}")
    for t in targets:
        target = TARGETS.get(t)
        if precision not in target.precisions:
            why = target.unsupported.get(precision)
            raise UsageError(f"--quantize {precision} is not supported by {t}" + (f" ({why})" if why else "")
                             + f"; {t} takes: {', '.join(target.precisions)}")


def parse_targets(text: str, skipped: dict[str, str] | None = None) -> list[str]:
    """Target names from --target; for 'all', the available ones (the others go into `skipped` with the reason)."""
    from effai.export.targets import TARGETS

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        avail = [n for n, t in TARGETS.items() if t.available()[0]]
        if skipped is not None:
            skipped.update({n: t.available()[1] for n, t in TARGETS.items() if n not in avail})
        if not avail:
            missing = "; ".join(f"{n}: {t.available()[1]}" for n, t in TARGETS.items())
            raise EffaiError(f"--target all: no export toolchain is installed ({missing})")
        return avail
    for n in names:
        TARGETS.get(n)  # unknown -> UsageError listing the choices
    if not names:
        raise UsageError(f"--target is empty; choose from: {', '.join(TARGETS.names())} or all")
    return names


@app.command("export")
def export_cmd(
    model: Annotated[Optional[str], typer.Argument(help="Zoo or timm model name (effai zoo list); optional with "
                                                        "--weights from effai train or --model-def.")] = None,
    target: Annotated[str, typer.Option("--target", "-t",
                                        help="executorch | coreml | tflite | onnx, a comma list, or all.")] = "onnx",
    precision: Annotated[Optional[str], typer.Option("--quantize", "-q", "--precision", help=QUANTIZE_HELP)] = None,
    calib: Annotated[str, typer.Option(help="Calibration data for int8: auto (the card's data, else photos), "
                                       "photos, digits, an image folder or an .npz.")] = "auto",
    calib_samples: Annotated[int, typer.Option(help="Calibration inputs to use (warned below 32).")] = 128,
    io_dtype: Annotated[str, typer.Option(help="TFLite int8: float (float32 I/O) or int8 (int8 I/O).")] = "float",
    float_layers: Annotated[Optional[str], typer.Option(help="Comma list of layers (module names) to keep in "
                                                        "float when quantizing.")] = None,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="On a failed accuracy gate, fail instead of "
                                              "keeping the most sensitive layers in float.")] = False,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size H=W (default: the model card's).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="Full input shape NxCxHxW, e.g. 1x3x256x256.")] = None,
    batch: Annotated[int, typer.Option(help="Exported (static) batch size.")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact directory (default effai_out/<model>-<target>).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint: .safetensors, or .pt/.pth read with weights_only=True.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Download timm's hub weights (needs network).")] = False,
    model_def: Annotated[Optional[str], typer.Option(help="Your own module: path/file.py:ClassOrFactory.")] = None,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Export without re-parameterizing/fusing (recorded).")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the parity check (recorded in the manifest).")] = False,
    eval_data: Annotated[str, typer.Option("--eval", help="Top-1 of torch vs artifact on labelled data: digits, an "
                                           "image folder, an .npz, auto (the model card's own set) or none.")] = "auto",
    max_drop: Annotated[float, typer.Option(help="Fail when the artifact loses more top-1 points than this.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Fold a model, lower it to one or more targets, prove parity, write artifact dirs with manifests."""
    from effai import zoo
    from effai.export.pipeline import ExportConfig, ParityFailed, export, safe_name

    ui = console.err()
    results: list[dict[str, Any]] = []
    try:
        if batch < 1:
            raise UsageError(f"--batch {batch} must be >= 1")
        if input_size is not None and input_size < 1:
            raise UsageError(f"--input-size {input_size} must be >= 1")
        shape = parse_shape(input_shape) if input_shape else None
        skipped: dict[str, str] = {}
        targets = parse_targets(target, skipped)
        if precision is not None:
            check_precision(precision, targets)
        if skipped and not as_json:
            for n, why in skipped.items():
                ui.print(f"[yellow]! skipping {n}: {why}[/]")
        t0 = time.perf_counter()
        with ui.status(f"loading {model or model_def}", spinner="dots") if not as_json else nullcontext():
            loaded = zoo.create(model, weights=weights, pretrained=pretrained, model_def=model_def)
        load_s = time.perf_counter() - t0
        if not as_json:
            ui.print(f"[green]✓[/] load      {load_s:6.2f}s  {loaded.card.name} ({loaded.weights.source})")
            for note in loaded.notes:
                style = "bold yellow" if "RANDOM-INIT" in note else "yellow"
                ui.print(f"[{style}]! {note}[/]")
    except EffaiError as e:
        _fail(e, as_json)
    failed: EffaiError | None = None
    for t in targets:
        suffix = f"-{precision}" if precision and precision != _default_precision(t) else ""
        t_out = out if (out is None or len(targets) == 1) else out / f"{safe_name(loaded.card.name)}-{t}{suffix}"
        cfg = ExportConfig(target=t, precision=precision, input_shape=shape, input_size=input_size,  # type: ignore[arg-type]
                           batch=batch, out=t_out, fold=not no_fold, verify=not no_verify, eval=eval_data,
                           max_drop=max_drop, calib=calib, calib_samples=calib_samples, io_dtype=io_dtype,
                           fallback=not no_fallback,
                           float_layers=tuple(x.strip() for x in (float_layers or "").split(",") if x.strip()))
        try:
            res = export(loaded, cfg, progress=None if as_json else _progress(ui, t))
            results.append(_row(res))
            if not as_json:
                for w in res.manifest.get("warnings", []):
                    ui.print(f"[yellow]! {t}: {w}[/]")
        except ParityFailed as e:
            results.append({**_row(e.result), "error": str(e)})
            failed = failed or e
            if not as_json:
                ui.print(f"[bold red]✗ {e}[/]")
        except EffaiError as e:
            results.append({"target": t, "error": str(e), "exit_code": e.exit_code})
            failed = failed or e
            if not as_json:
                ui.print(f"[bold red]✗ {t}: {e}[/]")
        except Exception as e:  # a toolchain bug must not lose the other targets' results
            if os.environ.get("EFFAI_DEBUG"):
                raise
            err = EffaiError(f"internal error exporting to {t}: {type(e).__name__}: {e} (EFFAI_DEBUG=1 shows the "
                             "traceback; please report it)")
            results.append({"target": t, "error": str(err), "exit_code": 1})
            failed = failed or err
            if not as_json:
                ui.print(f"[bold red]✗ {err}[/]")
    if not as_json:
        _export_table(results)
    summary = {"ok": failed is None, "model": loaded.card.name, "random_init": loaded.random_init,
               "warnings": loaded.notes, "artifacts": results, "skipped_targets": skipped}
    if failed is not None:
        summary["error"], summary["exit_code"] = str(failed), failed.exit_code
    console.json_line(summary)
    if failed is not None:
        raise typer.Exit(failed.exit_code)


def _progress(ui: Any, target: str):
    status: dict[str, Any] = {}

    def cb(event: str, stage: str, detail: str, seconds: float) -> None:
        if event == "start":
            status["s"] = ui.status(f"{target}: {stage} {detail}", spinner="dots")
            status["s"].__enter__()
            return
        if "s" in status:
            status.pop("s").__exit__(None, None, None)
        mark = "[green]✓[/]" if event == "end" else "[red]✗[/]"
        ui.print(f"{mark} {stage:<9} {seconds:6.2f}s  [dim]{target}[/] {detail}")

    return cb


def _row(res: Any) -> dict[str, Any]:
    m = res.manifest
    p = m["parity"]
    model_path = res.out_dir / m["model_file"]
    size = sum(f["bytes"] for f in m["files"] if f["path"].startswith(m["model_file"]))
    return {"target": m["target"], "precision": m["precision"], "dir": str(res.out_dir), "file": str(model_path),
            "mb": round(size / 1e6, 3), "parity": p["status"], "max_abs_err": p.get("max_abs_err"),
            "parity_reason": p.get("reason"), "seconds": round(sum(res.timings.values()), 2),
            "accuracy": _acc_summary(m.get("accuracy"))}


def _acc_summary(a: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a:
        return None
    return {"status": a["status"], "torch_top1": a["torch"]["top1"],
            "artifact_top1": a.get("artifact", {}).get("top1"), "samples": a["samples"]}


def _export_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="effai export")
    show_acc = any(r.get("accuracy") for r in rows)
    for col in ("target", "file", "MB", "parity", *(("top-1",) if show_acc else ()), "seconds"):
        table.add_column(col, justify="right" if col in ("MB", "seconds") else "left",
                         overflow="fold", no_wrap=col in ("target", "MB", "seconds"))
    colors = {"pass": "green", "fail": "red", "not-run": "yellow"}
    for r in rows:
        if "file" not in r:
            table.add_row(r["target"], "-", "-", "[red]error[/]", *(("-",) if show_acc else ()), "-")
            continue
        par = r["parity"]
        if par == "pass" and r.get("max_abs_err") is not None:
            par = f"pass ({r['max_abs_err']:.1e})"
        elif par == "not-run":
            par = f"not-run: {r.get('parity_reason')}"
        acc = r.get("accuracy")
        top1 = (() if not show_acc else ("-",) if not acc else
                (f"{acc['artifact_top1']:.2%}" if acc["artifact_top1"] is not None else f"torch {acc['torch_top1']:.2%}",))
        table.add_row(r["target"], r["file"], f"{r['mb']:.2f}", f"[{colors.get(r['parity'], 'white')}]{par}[/]",
                      *top1, f"{r['seconds']:.1f}")
    console.out().print(table)


@app.command("verify")
def verify_cmd(artifact: Annotated[Path, typer.Argument(help="An artifact directory written by effai export.")],
               as_json: JsonOpt = False) -> None:
    """Re-check an artifact's file hashes and re-run parity in its runtime where one exists here."""
    from effai.export.verify import verify

    try:
        report = verify(artifact)
    except EffaiError as e:
        _fail(e, as_json)
    ok = report["hashes"] == "pass" and report["parity"]["status"] in ("pass", "not-run")
    if not as_json:
        ui = console.err()
        ui.print(f"{'[green]✓' if report['hashes'] == 'pass' else '[red]✗'}[/] hashes  {report['files']} files")
        p = report["parity"]
        color = {"pass": "green", "fail": "red"}.get(p["status"], "yellow")
        detail = p.get("reason") or f"max abs err {p.get('max_abs_err', 0):.2e}, cos {p.get('cosine', 0):.6f}"
        ui.print(f"[{color}]{'✓' if p['status'] == 'pass' else '!'}[/] parity  {p['status']}: {detail}")
    console.json_line({"ok": ok, **report})
    if not ok:
        raise typer.Exit(1)


@zoo_app.command("list")
def zoo_list(
    bundles: Annotated[Optional[Path], typer.Option("--bundles", help="Directory of bundles (effai zoo pack --out): "
                                                    "adds each model's best measured latency per device class "
                                                    "[default: ./bundles when it exists]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The zoo's model cards with task, size and cost (any timm model name works too)."""
    from rich.table import Table

    from effai.zoo import CARDS

    try:
        if bundles is not None and not bundles.is_dir():
            raise UsageError(f"--bundles {bundles} is not a directory; pass the --out of `effai zoo pack`")
        bundle_dir = bundles if bundles is not None else (Path("bundles") if Path("bundles").is_dir() else None)
        latency = _bundle_latency(bundle_dir) if bundle_dir is not None else {}
        rows = [_zoo_row(n, c, latency.get(n)) for n, c in CARDS.items()]
    except EffaiError as e:
        _fail(e, as_json)
    if not as_json:
        table = Table(title="effai zoo")
        for col in ("name", "task", "family", "params", "MACs", "input", "license", "weights", "best latency"):
            table.add_column(col, overflow="fold", no_wrap=col in ("name", "params", "MACs", "input"))
        for r in rows:
            best = "; ".join(f"{cls} {b['median_ms']:.2f} ms" for cls, b in (r["best_latency"] or {}).items()) or "-"
            macs = f"{r['macs'] / 1e9:.2f} G" if r["macs"] >= 1e9 else f"{r['macs'] / 1e6:.1f} M"
            table.add_row(r["name"], r["task"], r["family"], f"{r['params'] / 1e6:.2f} M", macs, r["input"],
                          r["license"].split(" (")[0], r["weights_available"], best)
        console.out().print(table)
    console.json_line({"ok": True, "models": rows, "bundles": str(bundle_dir) if bundle_dir is not None else None,
                       "macs_convention": "1 MAC = one multiply-add over Conv2d/Linear of the deploy form at the "
                                          "card's input size, batch 1 (docs/bundle.md)"})


def _zoo_row(name: str, c: Any, best: dict[str, Any] | None) -> dict[str, Any]:
    from effai.bundle.pack import TASK, card_stats

    stats = card_stats(name)
    return {"name": name, "task": TASK, "family": c.family, "params": stats["params"], "macs": stats["macs"],
            "input": "x".join(map(str, c.input_size)), "input_size": list(c.input_size), "classes": c.num_classes,
            "license": c.weights_license, "reparameterizable": c.reparameterizable,
            "weights": "bundled" if c.bundled_weights else "hub (--pretrained) / --weights; random-init without",
            "weights_available": "bundled" if c.bundled_weights else "hub",
            "description": c.description, "best_latency": best}


def _bundle_latency(root: Path) -> dict[str, dict[str, Any]]:
    """{model name: best measured latency per device class} over the bundles under root (root may be one bundle)."""
    from effai.bundle import index as bundle_index

    try:
        from effai.bundle.perf import best_latency
    except ImportError:
        best_latency = _best_latency_rows
    out: dict[str, dict[str, Any]] = {}
    for b in ([root] if (root / "bundle.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())):
        try:
            name = bundle_index.read(b)["model"]["name"]   # checked (hostile JSON too): a bad bundle is skipped
        except (EffaiError, KeyError, TypeError):
            continue
        try:
            best = best_latency(b)
        except EffaiError:      # an unreadable perf.json: that bundle shows no latency, the catalogue still lists
            continue
        if best:
            out[name] = best
    return out


def _best_latency_rows(root: Path) -> dict[str, dict[str, Any]]:
    from effai.bundle.card import perf_rows

    best: dict[str, dict[str, Any]] = {}
    for r in perf_rows(root):
        cls, ms = r.get("device_class"), r.get("median_ms")
        if isinstance(cls, str) and isinstance(ms, (int, float)) and (cls not in best or ms < best[cls]["median_ms"]):
            best[cls] = {k: r.get(k) for k in ("median_ms", "p90_ms", "device", "target", "precision", "threads")}
    return best


@zoo_app.command("pack")
def zoo_pack(
    model: Annotated[str, typer.Argument(help="Zoo or timm model name (effai zoo list).")],
    targets: Annotated[str, typer.Option("--targets", "-t", help="Comma list of executorch, coreml, tflite, onnx "
                                         "(or all: the available ones).")] = "all",
    quantize: Annotated[Optional[str], typer.Option("--quantize", "-q", help="Comma list of precisions (fp32,int8,"
                                                    "...); each target gets those it takes, the others are skipped "
                                                    "with a note. Default: each target's default.")] = None,
    eval_data: Annotated[str, typer.Option("--eval", help="Top-1 of torch vs each artifact: auto (the card's own "
                                           "set), digits, an image folder, an .npz, or none.")] = "auto",
    max_drop: Annotated[float, typer.Option(help="Fail an artifact losing more top-1 points than this.")] = 1.0,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint (.safetensors or .pt/.pth, weights only).")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Download timm's hub weights (needs network).")] = False,
    sign_key: Annotated[Optional[Path], typer.Option("--sign", help="Ed25519 private key (effai zoo keygen): "
                                                     "writes bundle.sig over bundle.json.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundles directory; the bundle is <out>/<model>/.")] = Path("bundles"),
    as_json: JsonOpt = False,
) -> None:
    """Export a model to several targets and pack an app-ready bundle: artifacts, labels, preprocessing, model card
    and bundle.json (every file's sha256). Exit 1 with status "partial" when a target failed; 0 when complete."""
    from effai.bundle.pack import pack

    ui = console.err()
    skipped: dict[str, str] = {}
    try:
        names = parse_targets(targets, skipped)
        if skipped and not as_json:
            for n, why in skipped.items():
                ui.print(f"[yellow]! skipping {n}: {why}[/]")

        def on_artifact(a: dict[str, Any]) -> None:
            if as_json:
                return
            color = {"pass": "green", "unverified": "yellow"}.get(a["status"], "red")
            ui.print(f"[{color}]{'✓' if a['status'] in ('pass', 'unverified') else '✗'}[/] {a['dir']}: {a['status']}"
                     + (f": {a['error']}" if a.get("error") else ""))

        res = pack(model, names, quantize.split(",") if quantize else None, out,
                   sign_key=sign_key, eval=eval_data, max_drop=max_drop, weights=weights, pretrained=pretrained,
                   progress=None if as_json else (lambda rel: _progress(ui, rel)), on_artifact=on_artifact)
    except EffaiError as e:
        _fail(e, as_json)
    index = res.index
    if not as_json:
        for s in res.skipped:
            ui.print(f"[yellow]! {s['target']} {s['precision']} skipped: {s['reason']}[/]")
        ui.print(f"{'[green]✓' if res.status == 'complete' else '[bold red]✗'}[/] bundle {res.root} ({res.status}, "
                 f"{len(index['files'])} files{', signed' if index.get('signing') else ''})")
    arts = [{k: a[k] for k in ("target", "precision", "dir", "status", "error", "bytes")} for a in index["artifacts"]]
    summary = {"ok": res.status == "complete", "status": res.status, "bundle": str(res.root),
               "model": index["model"]["name"], "artifacts": arts, "skipped": res.skipped,
               "skipped_targets": skipped, "files": len(index["files"]), "signed": index.get("signing") is not None}
    if res.status != "complete":
        failed = "; ".join(f"{a['dir']}: {a['status']}" for a in arts if a["status"] not in ("pass", "unverified"))
        summary["error"], summary["exit_code"] = f"partial bundle ({failed})", 1
    console.json_line(summary)
    if res.status != "complete":
        raise typer.Exit(1)


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="Zoo or timm model name.")], as_json: JsonOpt = False) -> None:
    """One model card in full, with its parameter count."""
    from effai import zoo

    try:
        loaded = zoo.create(name)
    except EffaiError as e:
        _fail(e, as_json)
    card = loaded.card
    info = {"name": card.name, "family": card.family, "source": card.source, "input_size": list(card.input_size),
            "num_classes": card.num_classes, "label_set": card.label_set, "labels_preview": zoo.labels(card)[:5],
            "preprocessing": card.preprocessing(), "weights_license": card.weights_license,
            "reparameterizable": card.reparameterizable, "bundled_weights": card.bundled_weights,
            "params": sum(p.numel() for p in loaded.model.parameters()), "description": card.description,
            "weights": loaded.weights.source, "weights_sha256": loaded.weights.sha256}
    record = card.extra.get("train_record")
    if record:
        cfg = record.get("config", {})
        info["trained"] = {"recipe": record.get("recipe"), "data": cfg.get("data"), "teacher": cfg.get("teacher"),
                           "loss": cfg.get("loss"), "epochs": record.get("epochs"),
                           "held_out_top1": record.get("val_acc"), "folded": record.get("folded")}
    if not as_json:
        from rich.table import Table

        table = Table(title=card.name, show_header=False)
        for k, v in info.items():
            table.add_row(k, str(v))
        console.out().print(table)
    console.json_line({"ok": True, "model": info})


@app.command("doctor")
def doctor(as_json: JsonOpt = False) -> None:
    """What this machine can do: targets, host runtimes, toolchain versions."""
    from effai import toolchain
    from effai.export.targets import TARGETS

    targets = {}
    for n, t in TARGETS.items():
        ok, why = t.available()
        targets[n] = {"available": ok, "detail": why, "precisions": list(t.precisions), "description": t.description}
    versions = toolchain.versions()
    if not as_json:
        from rich.table import Table

        table = Table(title="effai doctor: targets")
        for col in ("target", "available", "precisions", "detail"):
            table.add_column(col)
        for n, r in targets.items():
            table.add_row(n, "[green]yes[/]" if r["available"] else "[red]no[/]", ", ".join(r["precisions"]), r["detail"])
        console.out().print(table)
        console.out().print(" ".join(f"{k}={v}" for k, v in versions.items()))
    console.json_line({"ok": True, "targets": targets, "toolchain": versions})


from effai.cli_bench import register as _register_bench_command  # noqa: E402  (effai bench)
from effai.cli_train import register as _register_train_command  # noqa: E402  (effai train)
from effai.cli_devit import register as _register_devit_commands  # noqa: E402  (effai devit serve|run)
from effai.cli_bundle import register as _register_bundle_commands  # noqa: E402  (zoo verify/unpack/install/...)

_register_train_command(app)
_register_devit_commands(app)
_register_bench_command(app)
_register_bundle_commands(zoo_app)


def main() -> None:
    """Console-script entry: unexpected exceptions still end with a message, a JSON line and exit code 1."""
    from typer._click import exceptions as click_exc   # typer vendors click

    console.reset()
    try:
        rc = app(standalone_mode=False)
        if rc == 130 and not console.json_written():   # typer turns Ctrl-C into Exit(130) before effai sees it
            raise KeyboardInterrupt
        sys.exit(rc if isinstance(rc, int) else 0)
    except click_exc.NoArgsIsHelpError:   # `effai` alone: the help was printed
        console.json_line({"ok": False, "error": "no command given", "exit_code": 2})
        sys.exit(2)
    except click_exc.ClickException as e:  # bad option, missing argument, bad value: exit 2 + JSON line
        e.show()
        console.json_line({"ok": False, "error": e.format_message(), "exit_code": e.exit_code})
        sys.exit(e.exit_code)
    except (typer.Exit, typer.Abort) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except SystemExit:
        raise
    except EffaiError as e:
        console.err().print(f"[bold red]error:[/] {e}")
        console.json_line({"ok": False, "error": str(e), "exit_code": e.exit_code})
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.err().print("[red]interrupted[/]; nothing half-written was left behind")
        console.json_line({"ok": False, "interrupted": True, "error": "interrupted", "exit_code": 130})
        sys.exit(130)
    except Exception as e:  # a bug in effai or a toolchain: still one clear line, a JSON line and exit 1
        if os.environ.get("EFFAI_DEBUG"):
            raise
        console.err().print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (rerun with EFFAI_DEBUG=1 for the "
                            "traceback, and please report it)")
        console.json_line({"ok": False, "error": f"internal error: {type(e).__name__}: {e}", "exit_code": 1})
        sys.exit(1)
