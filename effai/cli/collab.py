"""`effai collab serve SPLIT_DIR` (the server half, hosting the authenticated channel) and `effai collab run
SPLIT_DIR --connect HOST:PORT` (the device half on held-out images, end-to-end latency vs all-local). docs/split.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

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
    split_dirs: Annotated[List[Path], typer.Argument(help="One or more effai split exports (with --ae) of one "
                                                     "model; each request names which one to run.")],
    target: Annotated[str, typer.Option(help="Which exported halves to run.")] = "onnx",
    host: Annotated[str, typer.Option(help="Exact address to bind (default loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = 29600,
    token_file: TokenOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for each request before giving up.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Run the server halves (decoder + tail) of every given split for one device until it is done."""
    from effai.collab.live import serve

    try:
        token = _token(token_file, create=True)
        ui = console.err()
        names = ", ".join(map(str, split_dirs))
        res = serve(split_dirs, target, host, port, token, wait,
                    on_ready=lambda p: ui.print(f"serving {names} ({target}) on {host}:{p}", highlight=False))
    except EffaiError as e:
        fail(e, as_json)
    console.json_line({"ok": True, **res})


@collab_app.command("run")
def run_cmd(
    split_dirs: Annotated[List[Path], typer.Argument(help="The split export(s) this device may run (the server "
                                                     "must host the ones it picks).")],
    connect: Annotated[str, typer.Option(help="HOST:PORT of effai collab serve.")] = "127.0.0.1:29600",
    target: Annotated[str, typer.Option(help="Which exported halves to run.")] = "onnx",
    images: Annotated[int, typer.Option(help="Held-out images to send.")] = 100,
    local: Annotated[Optional[Path], typer.Option(help="The whole model's artifact dir: also time all-local.")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="A MAHPPO policy (effai collab train-policy) that picks the "
                                                   "split and power per request from the measured link.")] = None,
    agent: Annotated[int, typer.Option(help="Which of the policy's devices this one is.")] = 0,
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
        res = run(split_dirs, target, h, int(p), _token(token_file, create=False), images, wait, local, policy,
                  agent)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        loc = f", all-local {res['local_ms_median']:.3f} ms" if "local_ms_median" in res else ""
        console.out().print(f"{res['images']} images split at {res['point']}: end-to-end {res['e2e_ms_median']:.3f} ms "
                            f"(device {res['device_ms_median']:.3f} ms){loc}, {res['bytes_per_request']} B/request, "
                            f"top-1 {res['top1']:.2%}")
        if "split_share" in res:
            console.out().print("policy picked: " + ", ".join(f"{k} {v:.0%}" for k, v in res["split_share"].items()))
    console.json_line({"ok": True, **res})


@collab_app.command("train-policy")
def train_policy_cmd(
    split_dirs: Annotated[Optional[List[Path]], typer.Argument(help="Split exports (with --ae) of one model: the "
                                                               "policy's options, timed here.")] = None,
    out: Annotated[Path, typer.Option(help="Where to save the policy (safetensors).")] = Path("runs/mahppo.policy"
                                                                                             ".safetensors"),
    local: Annotated[Optional[Path], typer.Option(help="The whole model's artifact dir (the 'local' option and "
                                                  "the reward's reference); needed with SPLIT_DIRS.")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="A profile JSON instead of timing exports (e.g. "
                                                    "benchmarks/results/split_profile_*.json).")] = None,
    target: Annotated[str, typer.Option(help="Which exported halves to time.")] = "onnx",
    devices: Annotated[int, typer.Option(help="Devices sharing the channel and server.")] = 4,
    steps: Annotated[int, typer.Option(help="Environment rounds of training.")] = 128 * 24,
    server_speedup: Annotated[float, typer.Option(help="Server speed relative to the measured host times.")] = 10.0,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train a MAHPPO policy on the split-inference environment built from measured split exports; save it."""
    from effai.collab.policy import profile_from_exports, train_policy
    from effai.files import read_json

    try:
        if (profile is None) == (not split_dirs):
            raise UsageError("give SPLIT_DIRS (with --local) or --profile JSON, not both or neither")
        if profile is not None:
            prof = read_json(profile, str(profile))
            if not isinstance(prof, dict):
                raise UsageError(f"{profile} is not a profile object; rebuild it with benchmarks/mahppo.py")
        else:
            if local is None:
                raise UsageError("--local DIR is needed with SPLIT_DIRS: the whole model exported (effai export "
                                 "MODEL --target onnx) is the 'local' option and the reward's reference")
            prof = profile_from_exports(list(split_dirs or []), target, local)
        ui = console.err() if as_json else console.out()
        res = train_policy(prof, out, devices, steps, seed, server_speedup,
                           progress=None if as_json else (lambda s: ui.print(f"[dim]{s}[/]")))
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        b = res["best_fixed"]
        console.out().print(f"saved {res['out']}: options {', '.join(res['options'])}; reward MAHPPO "
                            f"{res['reward_mahppo']:.4f}, all-local {res['reward_all_local']:.4f}, best fixed "
                            f"{b['option']} {b['reward']:.4f} ({res['train_seconds']} s)")
    console.json_line({"ok": True, **res, "profile": prof})


def register(app: typer.Typer) -> None:
    app.add_typer(collab_app, name="collab")
