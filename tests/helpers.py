"""Plain helpers the tests import (`from tests.helpers import run_cli`); fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SMALL = 64        # smallest size GhostNetV3's DFC gate supports (avgpool 2x2 on 1x1 maps breaks below)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so folding BN is really tested (fresh BNs are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.2, generator=g)


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Files under a fake root (a sysfs tree for EFFAI_SYSFS_ROOT): {"/sys/class/...": "text"}."""
    for rel, text in files.items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def plant(root: Path, name: str, script: str) -> Path:
    """An executable stand-in program in root/bin (LocalFS.run looks there first under a fake root)."""
    p = root / "bin" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(script)
    p.chmod(0o755)
    return p


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `effai ARGS` in a real process; returns (exit code, last-line JSON object or None, stdout, stderr)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "effai", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    last = None
    if lines:
        try:
            last = json.loads(lines[-1])
        except json.JSONDecodeError:
            last = None
    return proc.returncode, last, proc.stdout, proc.stderr


DEVIT_SIZE = 16   # DeViT tests: 16x16 digits, patch 4: 16 patches + CLS for teacher and parts alike


def call_cli(capfd, fn, **kw) -> tuple[int, dict, str]:
    """(exit code, last JSON line, stdout) of a CLI command function called in process (a subprocess costs ~10 s)."""
    import typer

    from effai import console

    capfd.readouterr()
    console.reset()                     # the JSON line goes to this test's captured stdout
    code = 0
    try:
        fn(**kw)
    except typer.Exit as e:
        code = e.exit_code
    finally:
        console.reset()
    out = capfd.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


@contextlib.contextmanager
def refused_port():
    """A loopback port that refuses connections for the whole block: bound, never listening, so no other test
    running beside this one (pytest-xdist) can start a server on it, as it could on a port merely found free."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
