"""`effai split MODEL --at POINT --targets ...` (device half + encoder, server half + decoder, composed parity) and
`effai split-ae MODEL` (MAHPPO's feature autoencoders per split point and rate). docs/split.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail, parse_targets
from effai.errors import EffaiError, UsageError


def split_cmd(
    model: Annotated[str, typer.Argument(help="Zoo or timm name of a CNN, e.g. ghostnetv3_050.digits, resnet18.")],
    at: Annotated[Optional[str], typer.Option("--at", help="Split point (a stage exit); omit to list them.")] = None,
    targets: Annotated[str, typer.Option("--targets", help="Comma-separated targets, e.g. onnx,tflite,executorch.")]
    = "onnx",
    ae: Annotated[Optional[Path], typer.Option("--ae", help="A run of effai split-ae: the device half ends with its "
                                               "encoder, the server half starts with its decoder.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint for MODEL.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output dir (default effai_out/split-<model>-<point>).")] = None,
    device_precision: Annotated[str, typer.Option("--device-precision", help="Precision of the device half only "
                                                  "(int8, int8-dynamic, fp16 where the target has it); the server "
                                                  "half stays fp32.")] = "fp32",
    max_drop: Annotated[float, typer.Option("--max-drop", help="With a quantized device half: fail when the composed "
                                            "pipeline loses more held-out top-1 points than this.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Cut a CNN into a device half and a server half, export both, check the composed pipeline in each runtime."""
    try:
        names = parse_targets(targets)
        if at is None:
            from effai import zoo
            from effai.zoo.split import split_model

            loaded = zoo.create(model, weights=weights)
            sm = split_model(loaded.model, loaded.card.input_size)
            pts = [{"point": p.name, "feature_shape": list(p.shape), "feature_bytes_fp32": p.feature_bytes}
                   for p in sm.points]
            if not as_json:
                for p in pts:
                    console.out().print(f"{p['point']:<12} feature {'x'.join(map(str, p['feature_shape'])):<10} "
                                        f"{p['feature_bytes_fp32']:>8} B fp32")
            console.json_line({"ok": True, "model": model, "points": pts})
            return
        from effai.collab.export import export_split

        dest = out or Path("effai_out") / f"split-{model.replace('/', '_')}-{at.replace('.', '_')}"
        ui = console.err() if as_json else console.out()
        rec = export_split(model, at, names, dest, ae, weights, progress=lambda s: ui.print(f"[dim]{s}[/]"),
                           device_precision=device_precision, max_drop=max_drop)
    except EffaiError as e:
        fail(e, as_json)
    bad = [t for t, e in rec["targets"].items()
           if e["composed"]["status"] == "fail" or "fail" in (e["device"]["parity"], e["server"]["parity"])]
    if not as_json:
        for t, e in rec["targets"].items():
            c = e["composed"]
            acc = f", top-1 {c['eval']['top1']:.2%} on {c['eval']['samples']}" if "eval" in c else ""
            if "drop_points" in c.get("eval", {}):
                acc += (f" ({e['device']['precision']} device half: top-1 drop {c['eval']['drop_points']:.2f} "
                        "points vs the fp32 split)")
            if c.get("reason"):
                acc += f": {c['reason']}"
            console.out().print(f"{t:<11} device {e['device']['parity']}, server {e['server']['parity']}, composed "
                                f"{c['status']}{acc}")
        console.out().print(f"{rec['bytes_per_image']} bytes per image cross the cut -> {dest}")
    console.json_line({"ok": not bad, "out": str(dest), "point": rec["point"], "bytes_per_image": rec["bytes_per_image"],
                       "targets": {t: e["composed"]["status"] for t, e in rec["targets"].items()},
                       **({"error": f"parity failed on {', '.join(bad)}", "exit_code": 1} if bad else {})})
    if bad:
        raise typer.Exit(1)


def split_ae_cmd(
    model: Annotated[str, typer.Argument(help="A zoo model with labelled data on its card (ghostnetv3_050.digits).")]
    = "ghostnetv3_050.digits",
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/split_ae"),
    points: Annotated[Optional[str], typer.Option(help="Comma-separated split points (default: every stage exit).")]
    = None,
    rates: Annotated[str, typer.Option(help="Comma-separated REDUCTIONxBITS autoencoders, e.g. 4x4,8x2.")] = "4x4,8x2",
    epochs: Annotated[int, typer.Option(help="Epochs with the DNN frozen.")] = 3,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs fine-tuning autoencoder + tail.")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train MAHPPO's feature autoencoders (DNN frozen, then fine-tuned) and report top-1 and bytes per image."""
    from effai.train.split_ae import SplitAEConfig, train_split_ae

    try:
        try:
            rs = tuple((int(a), int(b)) for a, b in (r.lower().split("x") for r in rates.split(",") if r.strip()))
        except ValueError:
            raise UsageError(f"--rates '{rates}' must look like 4x4,8x2 (channel reduction x bits)") from None
        if not rs or epochs < 0 or finetune_epochs < 0:
            raise UsageError("--rates needs at least one REDUCTIONxBITS and epochs must be >= 0")
        cfg = SplitAEConfig(model=model, out=str(out), rates=rs, epochs=epochs, finetune_epochs=finetune_epochs,
                            seed=seed, points=tuple(p.strip() for p in (points or "").split(",") if p.strip()))
        ui = console.err() if as_json else console.out()
        rep = train_split_ae(cfg, progress=lambda s: ui.print(s))
    except EffaiError as e:
        fail(e, as_json)
    console.json_line({"ok": True, "out": str(out), "val_top1_model": rep["val_top1_model"],
                       "rows": [{k: r[k] for k in ("point", "reduction", "bits", "code_bytes", "val_top1_frozen",
                                                   "val_top1")} for r in rep["rows"]]})


def register(app: typer.Typer) -> None:
    app.command("split")(split_cmd)
    app.command("split-ae")(split_ae_cmd)
