"""Shared fixtures: tiny inputs, session-scoped exports reused by many tests, a CLI runner (real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    """240 real digits (24 per class) as a CIFAR-style .npz: small enough for quick epochs."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.concatenate([np.nonzero(d.target == c)[0][:24] for c in range(10)])
    x = np.round(d.images[idx] * 255 / 16).astype(np.uint8)[..., None]      # N,8,8,1
    path = tmp_path_factory.mktemp("data") / "digits240.npz"
    np.savez(path, x=x, y=d.target[idx], classes=np.array([str(i) for i in range(10)]))
    return path


DEVIT_SIZE = 16   # DeViT tests: 16x16 digits, patch 4: 16 patches + CLS for teacher and parts alike


@pytest.fixture(scope="session")
def devit_teacher(tmp_path_factory, digits_npz):
    """A vit_tiny checkpoint on the 240 digits (random init: the DeViT tests check the pipeline, the benchmark its
    accuracy), shared by every DeViT test module."""
    from effai import zoo
    from effai.train import data as data_mod
    from effai.train.models import build_student, save_model
    from effai.train.recipes import make_config

    root = tmp_path_factory.mktemp("devit_teacher")
    cfg = make_config("supervised", student="vit_tiny", data=str(digits_npz), input_size=DEVIT_SIZE, channels=1,
                      out=str(root), fold=False)
    full = data_mod.load(cfg.data, DEVIT_SIZE, 1)
    _, val = data_mod.split(full, 0.2, cfg.seed)
    _, card = build_student(cfg, full.classes)
    card = card.with_(extra={**card.extra, "arch_kwargs": {"patch_size": 4}})
    torch.manual_seed(0)
    model = zoo.build(card)
    save_model(model, card, cfg, root, val, {"dataset": {"source": str(digits_npz)}, "history": [], "world_size": 1},
               "raw")
    return root


@pytest.fixture(scope="session")
def small_exports(tmp_path_factory):
    """ghostnetv3_050 at 64x64 exported once to every target; many tests read these artifacts."""
    from effai import zoo
    from effai.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("exports")
    loaded = zoo.create("ghostnetv3_050")
    randomize_bn(loaded.model)
    results = {}
    for target in ("executorch", "onnx", "tflite", "coreml"):
        results[target] = export(loaded, ExportConfig(target=target, input_size=SMALL, out=root / target))
    return results
