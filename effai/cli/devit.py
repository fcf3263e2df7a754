"""`effai devit serve|run`: DeViT collaborative inference, one process per device (torch.distributed gloo over TCP).

Registered on the app by effai/cli/app.py (`register(app)`); the runtime itself is effai.devit_runtime. Only peers
holding the run's token (--token-file, mode 0600, or $EFFAI_DEVIT_TOKEN) join; `--local` starts its devices as
`python -m effai devit serve ...`. Usage: docs/distill.md, "DeViT"; the token: docs/security.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError

devit_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                        help="DeViT collaborative inference: parts on devices, fusion head on a coordinator.")
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds any wait may take (join, send, receive) "
                                           "before the run fails naming the device.")]
ServeTimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait to reach the coordinator and for "
                                                "its go; after the go the coordinator's --timeout bounds every wait.")]
TokenOpt = Annotated[Optional[Path], typer.Option("--token-file", help="The run's shared secret (a file only you can "
                                                  "read); default: $EFFAI_DEVIT_TOKEN.")]


def _threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise UsageError(f"--threads {n} must be >= 1")
        import torch

        torch.set_num_threads(n)


@devit_app.command("serve")
def serve_cmd(
    run: Annotated[Path, typer.Argument(help="The effai train devit run directory (or a part_<i> checkpoint).")],
    part: Annotated[int, typer.Option("--part", help="Which part this device holds (0..N-1).")],
    coordinator: Annotated[str, typer.Option("--coordinator", help="HOST:PORT where effai devit run listens.")],
    timeout: ServeTimeoutOpt = 60.0,
    token_file: TokenOpt = None,
    data: Annotated[Optional[str], typer.Option(
        help="This device's images: digits / DIR / X.npz (its copy of the coordinator's data set) or random[:SEED]; "
             "default: the coordinator's random[:SEED]. Never a path the coordinator names.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads on this device.")] = None,
    fail_after: Annotated[Optional[int], typer.Option(hidden=True, help="Tests: die after this many batches.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hold one part on this device and answer the coordinator until it says stop."""
    from effai.devit_runtime.channel import TOKEN_ENV, resolve_token
    from effai.devit_runtime.parts import load_part
    from effai.devit_runtime.device import serve

    try:
        _threads(threads)
        token, _ = resolve_token(token_file)
        if token is None:
            raise UsageError(f"effai devit serve needs the run's token: --token-file FILE (the file effai devit run "
                             f"--token-file created, copied here with mode 0600) or ${TOKEN_ENV}")
        path = run / f"part_{part}" if (run / f"part_{part}").is_dir() else run
        if path.is_dir() and not (path / "model.safetensors").is_file():
            raise UsageError(f"{run} has no part_{part}/model.safetensors; give the run directory written by effai "
                             "train devit, or the part's checkpoint")
        loaded = load_part(path)
        if loaded.index != part:
            raise UsageError(f"{loaded.path} is part {loaded.index}, not --part {part}")
        if not as_json:
            console.err().print(f"[dim]… part {part} ({loaded.d_sub}-wide CLS) joining {coordinator}[/]")
        stats = serve(loaded, coordinator, token=token, timeout_s=timeout, data=data, fail_after=fail_after)
    except EffaiError as e:
        fail(e, as_json, {"part": part})
    if not as_json:
        console.err().print(f"[green]✓[/] part {part}: {stats['batches']} batches, "
                            f"compute median {stats['compute_ms'].get('median', 0):.2f} ms, "
                            f"{stats['bytes_sent']:,} bytes sent")
    console.json_line({"ok": True, **stats})


@devit_app.command("run")
def run_cmd(
    run: Annotated[Path, typer.Argument(help="The effai train devit run directory (fusion/ and part_<i>/).")],
    coordinator: Annotated[str, typer.Option("--coordinator", help="HOST:PORT to listen on (port 0 with --local: "
                                             "any free port).")] = "127.0.0.1:29500",
    local: Annotated[bool, typer.Option("--local", help="Start the N device processes on this host too.")] = False,
    data: Annotated[str, typer.Option(help="Images: random[:SEED], or digits / DIR / X.npz (its held-out split; "
                                      "reports accuracy).")] = "random",
    images: Annotated[int, typer.Option(help="Images to stream (whole batches).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 1,
    warmup: Annotated[int, typer.Option(help="Untimed batches first.")] = 2,
    send_images: Annotated[bool, typer.Option("--send-images", help="Send each batch from the coordinator to the "
                                              "devices (default: every device reads the images itself).")] = False,
    timeout: TimeoutOpt = 30.0,
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="The run's shared secret: read, or "
                                                       "created (mode 0600, a new random token) when missing; copy "
                                                       "it to every device. Default: $EFFAI_DEVIT_TOKEN; --local "
                                                       "makes its own.")] = None,
    threads: Annotated[int, typer.Option(help="torch threads per process.")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the report as JSON here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fuse the devices' CLS features into predictions; report latency, compute, traffic per device."""
    from effai.devit_runtime.channel import TOKEN_ENV, resolve_token
    from effai.devit_runtime.parts import load_run
    from effai.devit_runtime.coordinator import coordinate
    from effai.devit_runtime.messages import RunSpec
    from effai.devit_runtime.network import format_address, parse_address

    try:
        _threads(threads)
        host, port = parse_address(coordinator)
        if images < 1 or batch_size < 1 or warmup < 0:
            raise UsageError("--images and --batch-size must be >= 1 and --warmup >= 0")
        token, created = (None, False) if local else resolve_token(token_file, create=True)
        if not local and token is None:
            raise UsageError(f"a run across the network needs a shared token: pass --token-file FILE (created with a "
                             f"new token when missing; copy it to every device) or set ${TOKEN_ENV}")
        decomp = load_run(run)
        spec = RunSpec(data=data, images=images, batch_size=batch_size, warmup=warmup, timeout_s=timeout,
                       send_images=send_images)
        ui = console.err()
        if local:
            from effai.devit_runtime.local import run_local

            if not as_json:
                ui.print(f"[dim]… {decomp.fusion.parts} device processes + coordinator on this host[/]")
            result = run_local(decomp, run, spec, host=host, port=port, threads=threads)
        else:
            def listening(h: str, p: int) -> None:
                if not as_json:
                    where = format_address(h, p)
                    made = f"; created {token_file} (mode 0600): copy it to every device" if created else ""
                    ui.print(f"[dim]… listening on {where}{made}; start on each device i: effai devit serve RUN "
                             f"--part i --coordinator {where} --token-file FILE"
                             + ("" if send_images or data.startswith("random") else f" --data {data}") + "[/]")

            result = coordinate(decomp, coordinator, spec, token=token,  # type: ignore[arg-type]
                                on_listening=listening)
        report = {"run": str(run), **result.report}
        if out is not None:
            from effai.files import atomic_write

            atomic_write(out, json.dumps(report, indent=2) + "\n")
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        console.out().print(_table(report))
    console.json_line({"ok": True, **report})


@devit_app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="The effai train devit run directory (fusion/ and part_<i>/).")],
    target: Annotated[str, typer.Option("--target", "-t", help="Comma list: executorch, coreml, tflite, onnx.")] = "tflite",
    precision: Annotated[Optional[str], typer.Option("--quantize", "-q", help="Precision for every piece (default: "
                                                     "the target's).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory.")] = Path("effai_out/devit"),
    as_json: JsonOpt = False,
) -> None:
    """Export every part (for its device) and the fusion head (for the coordinator), with parity, and record which
    artifact runs where in devit_bundle.json."""
    from effai.cli.common import check_precision, parse_targets
    from effai.devit_runtime.export import export_run

    try:
        targets = parse_targets(target)
        if precision:
            check_precision(precision, targets)
        ui = console.err()
        record = export_run(run, targets, out, precision,
                            progress=None if as_json else (lambda what: ui.print(f"[dim]… export {what}[/]")))
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        for piece in record["pieces"]:
            name = "fusion head" if piece["role"] == "fusion" else f"part {piece['index']}"
            arts = ", ".join(f"{t}: {a['file']} ({a['parity']})" for t, a in piece["artifacts"].items())
            console.out().print(f"{name:<12} -> {piece['runs_on']}: {arts}")
        console.err().print(f"[green]✓[/] wrote {out}/devit_bundle.json")
    console.json_line({"ok": True, "out": str(out), **record})


def _table(r: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"DeViT {r['parts']} parts over {r['backend']} ({r['inputs']}), batch {r['batch_size']}, "
                    f"{r['images']} images")
    for col in ("node", "compute ms", "send ms", "bytes sent", "bytes/image"):
        t.add_column(col, justify="right" if col != "node" else "left")
    for d in r["devices"]:
        t.add_row(f"device {d['part']} (rank {d['rank']}, {d['host']})", f"{d['compute_ms'].get('median', 0):.2f}",
                  f"{d['send_ms'].get('median', 0):.2f}", f"{d['bytes_sent']:,}", f"{d['bytes_per_image']:,}")
    t.add_row("coordinator (fusion)", f"{r['fusion_ms'].get('median', 0):.2f}", "", "", "")
    t.caption = (f"end-to-end median {r['end_to_end_ms']['median']:.2f} ms / batch (p90 "
                 f"{r['end_to_end_ms']['p90']:.2f}), network+protocol {r['network_ms'].get('median', 0):.2f} ms, "
                 f"{r['throughput_images_per_s']:.0f} images/s"
                 + (f", accuracy {r['accuracy']:.2%}" if "accuracy" in r else ""))
    return t


def register(app: typer.Typer) -> None:
    """Add `effai devit serve|run` to the main typer app."""
    app.add_typer(devit_app, name="devit")

