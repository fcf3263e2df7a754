"""`effai sr ARTIFACT input.png --scale 2 -o out.png`: diffusion super-resolution (SRDiff / SAM-DiffSR) with a
trained run (torch) or an exported artifact (its runtime), tiled; `effai sr export RUN --target T`: export it;
`bench_dispatch`: what `effai bench` runs on SR artifacts (effai/superres/bench.py measures)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError


def sr_cmd(
    artifact: Annotated[str, typer.Argument(help="A run of `effai train sr`, an SR artifact dir, or the word "
                                            "'export' (then INPUT is the run to export).")],
    input: Annotated[Path, typer.Argument(help="The LR image (png, jpg, ...); for 'export' the run dir.")],
    scale: Annotated[Optional[int], typer.Option(help="Upscaling factor; must be the model's trained scale.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output PNG (export: the artifact dir, default "
                                                "effai_out/srdiff-x<scale>-<target>).")] = None,
    steps: Annotated[int, typer.Option(help="DDIM sampler steps (4-20 is the useful range).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise (the output is a function of it).")] = 0,
    overlap: Annotated[int, typer.Option(help="Tile overlap in LR pixels (blended).")] = 4,
    target: Annotated[str, typer.Option(help="export: onnx | executorch | tflite | coreml | all.")] = "onnx",
    quantize: Annotated[str, typer.Option(help="export: precision of encoder and step (fp32 default; fp16, "
                                          "int8-dynamic, int8-weight where the target has them; static int8 on "
                                          "executorch and onnx).")] = "fp32",
    max_psnr_drop: Annotated[Optional[float], typer.Option(help="export below fp32: refuse the artifact when its "
                                                           "PSNR on held-out photos falls more than this many dB "
                                                           "below fp32's (default 0.5).")] = None,
    min_fidelity: Annotated[Optional[float], typer.Option(help="export below fp32: also refuse it when its outputs "
                                                          "are fewer than this many dB PSNR from fp32's (default: "
                                                          "reported, not gated).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Super-resolve an image with SRDiff / SAM-DiffSR (tiled DDIM), or export a trained SR run."""
    try:
        if artifact == "export":
            result = _export(input, target, quantize, out, force, as_json, max_psnr_drop, min_fidelity)
        else:
            result = _upscale(Path(artifact), input, scale, out, steps, seed, overlap, force, as_json)
    except EffaiError as e:
        fail(e, as_json)
    console.json_line({"ok": True, **result})


def _upscale(artifact: Path, image: Path, scale: Optional[int], out: Optional[Path], steps: int, seed: int,
             overlap: int, force: bool, as_json: bool) -> dict:
    import time

    from effai.data import sr as data
    from effai.files import atomic_write
    from effai.superres import engine, sampler, tiles

    if out is None:
        raise UsageError("--out/-o OUT.png is required: where to write the super-resolved image")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must end in .png (lossless)")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    if overlap < 0:
        raise UsageError(f"--overlap {overlap} must be >= 0")
    lr = data.load_rgb(image)                       # bad images fail before the model loads
    model = engine.load(artifact)
    trained = model.spec["scale"]
    scale = trained if scale is None else scale
    if scale != trained:
        raise UsageError(f"--scale {scale} is not a scale this model was trained for; choose from: {trained}")
    sampler.timesteps(len(model.abar), steps)
    tile = model.spec["lr_size"]
    ov = min(overlap, tile - 1)
    n_tiles = len(tiles.starts(max(lr.shape[0], tile), tile, ov)) * len(tiles.starts(max(lr.shape[1], tile), tile, ov))
    t0 = time.perf_counter()
    if as_json:
        hr = engine.upscale(model, lr, scale, steps, seed, ov)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console.err(), transient=True) as bar:
            task = bar.add_task(f"sr x{scale} ({model.runtime}) tile 1/{n_tiles}", total=n_tiles * steps)
            hr = engine.upscale(model, lr, scale, steps, seed, ov,
                                on_tile=lambda k, n: bar.update(task, description=f"sr x{scale} ({model.runtime}) "
                                                                f"tile {min(k + 1, n)}/{n}"),
                                on_step=lambda: bar.advance(task))
    seconds = time.perf_counter() - t0
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(hr).save(buf, format="PNG")
    atomic_write(out, buf.getvalue())
    if not as_json:
        console.err().print(f"[green]✓[/] wrote {out} ({hr.shape[1]}x{hr.shape[0]}, {n_tiles} tile(s) x {steps} "
                            f"steps, {seconds:.1f}s, {model.runtime})")
    return {"out": str(out), "size": [hr.shape[1], hr.shape[0]], "scale": scale, "steps": steps, "tiles": n_tiles,
            "seconds": seconds, "runtime": model.runtime}


def _export(run: Path, target: str, precision: str, out: Optional[Path], force: bool, as_json: bool,
            max_psnr_drop: Optional[float] = None, min_fidelity: Optional[float] = None) -> dict:
    from effai.cli.common import parse_targets
    from effai.superres.export import export_sr, precision_refusal
    from effai.zoo import srdiff

    skipped: dict[str, str] = {}
    targets = parse_targets(target, skipped)
    if len(targets) > 1:     # several targets: the ones without this precision are skipped, said why
        skipped.update({t: why for t in targets if (why := precision_refusal(t, precision))})
        targets = [t for t in targets if t not in skipped]
        if not targets:
            raise UsageError(f"--quantize {precision}: no target given takes it ({next(iter(skipped.values()))})")
    _, meta = srdiff.load(run)          # a bad run fails before any lowering
    scale = (meta.get("srdiff") or {}).get("scale", "?")
    rows = []
    for t in targets:
        suffix = "" if precision == "fp32" else f"-{precision}"
        dest = (out if (out is not None and len(targets) == 1)
                else (out or Path("effai_out")) / f"srdiff-x{scale}-{t}{suffix}")
        log = Path(f"{dest}.export.log")
        dest.parent.mkdir(parents=True, exist_ok=True)
        status = None if as_json else console.err().status(f"{t}: lowering encoder and step")
        if status:
            status.start()
        try:
            rep = export_sr(run, t, dest, precision, force, log, max_psnr_drop=max_psnr_drop,
                            min_fidelity_db=min_fidelity)
        finally:
            if status:
                status.stop()
        parity = {k: v["parity"]["status"] for k, v in rep["parts"].items()}
        rows.append({"target": t, "precision": precision, "dir": str(dest), "parity": parity,
                     "sampler_parity": rep.get("sampler_parity"), "psnr_gate": rep.get("psnr_gate")})
        if not as_json:
            sp, g = rep.get("sampler_parity") or {}, rep.get("psnr_gate")
            gate = (f"; PSNR gate {g['status']}: {g['reference_psnr_db']:.2f} -> {g['artifact_psnr_db']:.2f} dB "
                    f"(drop {g['drop_db']:.3f} <= {g['max_drop_db']}); outputs {g['fidelity_psnr_db']} dB PSNR from "
                    "fp32's") if g else ""
            console.err().print(f"[green]✓[/] {t}: {dest}  parity encoder {parity['encoder']}, step {parity['step']}"
                                f"; sampler vs torch: max pixel diff {sp.get('max_pixel_diff', 'n/a')}{gate}")
    if not as_json:
        for t, why in skipped.items():
            console.err().print(f"[yellow]! skipped {t}: {why}[/]")
    return {"exported": rows, "skipped": skipped}


def bench_dispatch(artifacts: list[Path], size: str | None, steps: int, runs: int, warmup: int,
                   not_used: dict[str, Any], as_json: bool) -> bool:
    """`effai bench` routing: False when no artifact is an SR artifact (the other benches run); else bench each,
    print a table per artifact and the JSON line {"ok", "sr": [...]}. A mix with other artifacts, another device or
    an option of the single-forward bench is refused before anything runs."""
    from effai.superres.bench import bench_sr, is_artifact, parse_size

    srs = [a for a in artifacts if is_artifact(a)]
    if not srs:
        if size is not None or steps != 8:
            fail(UsageError(f"--sr-size/--sr-steps apply to SR artifacts (effai sr export) only, and {artifacts[0]} "
                            "is not one; drop them"), as_json)
        return False
    rows = []
    try:
        other = [a for a in artifacts if a not in srs]
        if other:
            raise UsageError(f"{other[0]} is not an SR artifact but {srs[0]} is; bench them in separate effai bench "
                             "calls")
        bad = [k for k, v in not_used.items() if v]
        if bad:
            raise UsageError(f"{', '.join(bad)}: not available for SR artifacts (measured on this host in the "
                             "artifact's runtime); drop them (options: --sr-size, --sr-steps, --runs, --warmup, "
                             "--json)")
        wh = parse_size(size)
        rows = [bench_sr(a, wh, steps, runs, warmup) for a in srs]
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        from rich.table import Table

        for r in rows:
            t = Table(title=f"effai bench: {r['artifact']} (SR x{r['scale']}, {r['precision']}, {r['runtime']}, "
                            "this host)")
            for col in ("metric", "median", "p90"):
                t.add_column(col, justify="left" if col == "metric" else "right")
            (w, h), (W, H) = r["lr_size"], r["hr_size"]
            t.add_row(f"time per image (ms): {w}x{h} -> {W}x{H}, {r['tiles']} tile(s) x {r['steps']} steps",
                      f"{r['ms_per_image']['median']:.2f}", f"{r['ms_per_image']['p90']:.2f}")
            t.add_row("denoiser step (ms per call)", f"{r['ms_per_step']['median']:.3f}",
                      f"{r['ms_per_step']['p90']:.3f}")
            t.add_row("LR encoder (ms per tile)", f"{r['ms_per_encode']['median']:.3f}",
                      f"{r['ms_per_encode']['p90']:.3f}")
            t.add_row("HR megapixels/s", f"{r['hr_megapixels_per_s']:.4f}", "-")
            t.add_row(f"first image / load (ms): {r['first_ms']:.1f} / {r['load_ms']:.1f}", "-", "-")
            t.add_row("files (MB)", f"{r['artifact_bytes'] / 1e6:.2f}", "-")
            console.out().print(t)
        console.err().print(f"[dim]median (p90) over {runs} image(s) after {warmup} warm-up; per image: the tiled "
                            "DDIM sampler of effai sr around the exported step[/]")
    console.json_line({"ok": True, "sr": rows})
    return True


def register(app: typer.Typer) -> None:
    app.command("sr")(sr_cmd)
