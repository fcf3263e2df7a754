"""`effai export`, `effai verify` and `effai doctor`: fold, lower and prove an artifact; re-check one; what this
machine can do."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import (QUANTIZE_HELP, JsonOpt, check_precision, default_precision, fail, parse_shape,
                              parse_targets, progress_printer)
from effai.errors import EffaiError, UsageError


def export_cmd(
    model: Annotated[Optional[str], typer.Argument(help="Zoo or timm model name (effai zoo list); optional with "
                                                        "--weights from effai train or --model-def. A generative "
                                                        "model (ADEM-VL card or run dir, LM dir) exports with "
                                                        "--target executorch as a generation artifact.")] = None,
    target: Annotated[str, typer.Option("--target", "-t",
                                        help="executorch | coreml | tflite | onnx, a comma list, or all.")] = "onnx",
    precision: Annotated[Optional[str], typer.Option("--quantize", "-q", "--precision", help=QUANTIZE_HELP.replace("|", " | "))] = None,
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
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact directory (default effai_out/<model>-<target> then -<precision>, -<HxW>, -w<weights sha> where they differ from the defaults).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint: .safetensors, or .pt/.pth read with weights_only=True.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Download timm's hub weights (needs network).")] = False,
    model_def: Annotated[Optional[str], typer.Option(help="Your own module: path/file.py:ClassOrFactory.")] = None,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Export without re-parameterizing/fusing (recorded).")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the parity check (recorded in the manifest).")] = False,
    eval_data: Annotated[str, typer.Option("--eval", help="Top-1 of torch vs artifact on labelled data: digits, an "
                                           "image folder, an .npz, auto (the model card's own set) or none.")] = "auto",
    max_drop: Annotated[float, typer.Option(help="Fail when the artifact loses more top-1 points than this.")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an artifact at --out that was exported from another "
                                        "model, weights, precision or input shape.")] = False,
    as_json: JsonOpt = False,
) -> dict[str, Any] | None:
    """Fold a model, lower it to one or more targets, prove parity, write artifact dirs with manifests."""
    from effai import zoo
    from effai.export.artifact_dir import artifact_name
    from effai.export.pipeline import ExportConfig, ParityFailed, try_export

    if model is not None and model_def is None:
        from effai.cli import delvm
        from effai.generate.artifact import source_kind

        if delvm.is_source(model):            # a DeLVM card or run: tokenizer nets + KV-cache decoder, its own export
            fail(delvm.export_refusal(model), as_json)
        if source_kind(model) is not None:    # an LM dir, an ADEM-VL run or card: a generation artifact
            given = {"--weights": weights, "--pretrained": pretrained or None, "--input-size": input_size,
                     "--input-shape": input_shape, "--batch": batch if batch != 1 else None,
                     "--float-layers": float_layers, "--io-dtype": io_dtype if io_dtype != "float" else None}
            return _export_generative(model, target, precision, out, force, as_json, given)
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
        if calib not in ("auto", "photos", "digits"):   # before the model loads
            if not Path(calib).exists():
                raise UsageError(f"--calib {calib}: no such file or directory; give auto, photos, digits, DIR, "
                                 "FILE.npz")
            if not Path(calib).is_dir() and Path(calib).suffix.lower() != ".npz":
                raise UsageError(f"--calib {calib} is neither an image folder nor an .npz file; give auto, photos, "
                                 "digits, DIR, FILE.npz")
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
        fail(e, as_json)
    failed: EffaiError | None = None
    for t in targets:
        t_out = out
        if out is not None and len(targets) > 1:
            c, h, w = loaded.card.input_size
            full = shape or (batch, c, input_size or h, input_size or w)
            t_out = out / artifact_name(loaded, t, precision or default_precision(t), full, io_dtype)
        cfg = ExportConfig(target=t, precision=precision, input_shape=shape, input_size=input_size,  # type: ignore[arg-type]
                           batch=batch, out=t_out, fold=not no_fold, verify=not no_verify, eval=eval_data,
                           max_drop=max_drop, calib=calib, calib_samples=calib_samples, io_dtype=io_dtype,
                           fallback=not no_fallback, force=force,
                           float_layers=tuple(x.strip() for x in (float_layers or "").split(",") if x.strip()))
        o = try_export(loaded, cfg, progress=None if as_json else progress_printer(ui, t))
        if o.error is None:
            results.append(_row(o.result))
            if not as_json:
                for w in o.result.manifest.get("warnings", []):
                    ui.print(f"[yellow]! {t}: {w}[/]")
            continue
        failed = failed or o.error
        results.append({**_row(o.result), "error": str(o.error)} if o.result is not None else
                       {"target": t, "error": str(o.error), "exit_code": o.error.exit_code})
        if not as_json:
            ui.print(f"[bold red]✗ {o.error if isinstance(o.error, ParityFailed) else f'{t}: {o.error}'}[/]")
    if not as_json:
        _export_table(results)
    summary = {"ok": failed is None, "model": loaded.card.name, "random_init": loaded.random_init,
               "warnings": loaded.notes, "artifacts": results, "skipped_targets": skipped}
    if failed is not None:
        summary["error"], summary["exit_code"] = str(failed), failed.exit_code
    console.json_line(summary)
    if failed is not None:
        raise typer.Exit(failed.exit_code)
    return None


def _export_generative(source: str, target: str, precision: str | None, out: Path | None, force: bool,
                       as_json: bool, given: dict[str, Any]) -> dict[str, Any]:
    """`effai export <generative model> --target executorch`: the generation artifact (vision program + static-KV-cache
    decoder + tokenizer, docs/generate.md), the same export as `effai generate-export`. Refused before loading: other
    targets (the decoder runs only in ExecuTorch) and the single-forward options."""
    from effai.cli.generate import run_generation_export
    from effai.export.artifact_dir import safe_name
    from effai.generate.artifact import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_SEQ_LEN, source_name, vision_encoder

    try:
        if target.strip().lower() != "executorch":
            enc = vision_encoder(source)
            trunk = (f"; its vision trunk {enc} exports to onnx, tflite, coreml and executorch alone (effai export "
                     f"{enc} --target onnx)" if enc else "")
            raise UsageError(f"{source} generates text: its KV-cache decoder runs only in ExecuTorch, pass --target "
                             f"executorch (not {target}){trunk}")
        bad = [k for k, v in given.items() if v is not None]
        if bad:
            raise UsageError(f"{', '.join(bad)}: single-forward options, not used by a generative model's export; "
                             "drop them (the options are --quantize fp32|int8-weight|int4-weight, --out, --force; "
                             "more in effai generate-export)")
    except EffaiError as e:
        fail(e, as_json)
    precision = precision or "fp32"
    dest = out or Path("effai_out") / (f"{safe_name(source_name(source))}-executorch"
                                       + ("" if precision == "fp32" else f"-{precision}"))
    return run_generation_export(source, dest, precision, DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_NEW_TOKENS, None, force,
                                 as_json)


def _row(res: Any) -> dict[str, Any]:
    m = res.manifest
    p = m["parity"]
    model_path = res.out_dir / m["model_file"]
    size = sum(f["bytes"] for f in m["files"] if f["path"].startswith(m["model_file"]))
    return {"target": m["target"], "precision": m["precision"], "dir": str(res.out_dir), "file": str(model_path),
            "mb": round(size / 1e6, 3), "parity": p["status"], "max_abs_err": p.get("max_abs_err"),
            "parity_reason": p.get("reason"), "seconds": round(sum(res.timings.values()), 2),
            "accuracy": _acc_summary(m.get("accuracy")), "warnings": list(m.get("warnings", []))}


def _acc_summary(a: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a:
        return None
    return {"status": a["status"], "torch_top1": a["torch"]["top1"],
            "artifact_top1": a.get("artifact", {}).get("top1"), "samples": a["samples"]}


def _export_table(rows: list[dict[str, Any]]) -> None:
    out = console.out()
    table, notes = export_table(rows, out.width)
    out.print(table)
    for line in notes:          # plain lines: rich wraps them at the terminal's width, on spaces
        out.print(line, highlight=False)


_PARITY_COLORS = {"pass": "green", "fail": "red", "not-run": "yellow"}


def export_table(rows: list[dict[str, Any]], width: int) -> tuple[Any, list[str]]:
    """The results table for a terminal `width` wide, and the lines to print under it: each artifact's file goes
    in a last column when the whole table fits, else in a list under it; a parity not run says why under it. Every
    cell is whole (no column folds)."""
    from rich.markup import escape
    from rich.table import Table

    show_acc = any(r.get("accuracy") for r in rows)
    cols = ["target", "precision", "MB", "parity", *(["top-1"] if show_acc else []), "s"]
    cells: list[dict[str, str]] = []
    notes: list[str] = []
    for r in rows:
        if "file" not in r:
            cells.append({"target": r["target"], "precision": "-", "MB": "-", "parity": "error", "top-1": "-",
                          "s": "-", "file": "-"})
            continue
        par = r["parity"]
        if par in ("pass", "fail") and r.get("max_abs_err") is not None:
            par = f"{par} ({r['max_abs_err']:.1e})"
        elif par == "not-run":
            notes.append(f"{r['target']} {r['precision']}: parity not run: {r.get('parity_reason')}")
        acc = r.get("accuracy")
        top1 = ("-" if not acc else f"{acc['artifact_top1']:.2%}" if acc["artifact_top1"] is not None
                else f"torch {acc['torch_top1']:.2%}")
        cells.append({"target": r["target"], "precision": r["precision"], "MB": f"{r['mb']:.2f}", "parity": par,
                      "top-1": top1, "s": f"{r['seconds']:.1f}", "file": r["file"]})

    def need(col: str) -> int:
        return max([len(col), *(len(c[col]) for c in cells)]) + 3      # padding 2 + separator 1

    if 1 + sum(need(c) for c in [*cols, "file"]) <= width:
        cols.append("file")
    else:
        notes[:0] = [f"{c['target']} {c['precision']}: {c['file']}" for c in cells if c["file"] != "-"]
    table = Table(title="effai export")
    for col in cols:
        table.add_column(col, justify="right" if col in ("MB", "s") else "left", no_wrap=True, overflow="fold")
    for r, c in zip(rows, cells):
        status = "error" if "file" not in r else r["parity"]
        color = "red" if status == "error" else _PARITY_COLORS.get(status, "white")
        table.add_row(*(f"[{color}]{escape(c[col])}[/]" if col == "parity" else escape(c[col]) for col in cols))
    return table, notes


def verify_cmd(artifact: Annotated[Path, typer.Argument(help="An artifact directory written by effai export.")],
               as_json: JsonOpt = False) -> None:
    """Re-check an artifact's file hashes and re-run parity in its runtime where one exists here."""
    from effai.export.verify import verify

    try:
        report = verify(artifact)
    except EffaiError as e:
        fail(e, as_json)
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


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("verify")(verify_cmd)
    app.command("doctor")(doctor)
