"""`effai collab serve SPLIT_DIR` (the server half, hosting the authenticated channel) and `effai collab run
SPLIT_DIR --connect HOST:PORT` (the device half on held-out images, end-to-end latency vs all-local). docs/split.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError

collab_app = typer.Typer(no_args_is_help=True, help="Split inference across two processes (effai split exports).")

TokenOpt = Annotated[Optional[Path], typer.Option("--token-file", help="Token file shared by both sides (serve "
                                                  "creates it, mode 0600, when missing); else $EFFAI_DEVIT_TOKEN.")]


def _token(path: Optional[Path], create: bool) -> str:
    from effai.devit_runtime.channel import resolve_token

    token, _ = resolve_token(path, create)
    if token is None:
        raise UsageError("no token: pass --token-file PATH (serve creates it) or set $EFFAI_DEVIT_TOKEN")
    return token


@collab_app.command("serve")
def serve_cmd(
    split_dir: Annotated[Path, typer.Argument(help="An effai split export (with --ae).")],
    target: Annotated[str, typer.Option(help="Which exported halves to run.")] = "onnx",
    host: Annotated[str, typer.Option(help="Exact address to bind (default loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = 29600,
    token_file: TokenOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for each request before giving up.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Run the server half (decoder + tail) for one device until it is done."""
    from effai.collab.live import serve

    try:
        token = _token(token_file, create=True)
        ui = console.err()
        res = serve(split_dir, target, host, port, token, wait,
                    on_ready=lambda p: ui.print(f"serving {split_dir} ({target}) on {host}:{p}", highlight=False))
    except EffaiError as e:
        fail(e, as_json)
    console.json_line({"ok": True, **res})


@collab_app.command("run")
def run_cmd(
    split_dir: Annotated[Path, typer.Argument(help="The same effai split export the server runs.")],
    connect: Annotated[str, typer.Option(help="HOST:PORT of effai collab serve.")] = "127.0.0.1:29600",
    target: Annotated[str, typer.Option(help="Which exported halves to run.")] = "onnx",
    images: Annotated[int, typer.Option(help="Held-out images to send.")] = 100,
    local: Annotated[Optional[Path], typer.Option(help="The whole model's artifact dir: also time all-local.")] = None,
    token_file: TokenOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the server (connect and each answer).")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Run the device half (head + encoder) on held-out images, send the codes, time the round trips."""
    from effai.collab.live import run

    try:
        h, _, p = connect.rpartition(":")
        if not h or not p.isdigit():
            raise UsageError(f"--connect {connect}: give HOST:PORT, e.g. 127.0.0.1:29600")
        if images < 1:
            raise UsageError(f"--images {images} must be >= 1")
        res = run(split_dir, target, h, int(p), _token(token_file, create=False), images, wait, local)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        loc = f", all-local {res['local_ms_median']:.3f} ms" if "local_ms_median" in res else ""
        console.out().print(f"{res['images']} images split at {res['point']}: end-to-end {res['e2e_ms_median']:.3f} ms "
                            f"(device {res['device_ms_median']:.3f} ms){loc}, {res['bytes_per_request']} B/request, "
                            f"top-1 {res['top1']:.2%}")
    console.json_line({"ok": True, **res})


def register(app: typer.Typer) -> None:
    app.add_typer(collab_app, name="collab")
