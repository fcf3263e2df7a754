"""Interrupted and killed commands: Ctrl-C ends with the JSON line and exit 130, leftovers of a killed export are
cleaned by the next one, a full disk while checkpointing is one clear error with no temp file left."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effai.errors import EffaiError


def _start(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    # a suite run as a background job inherits SIGINT ignored: give the child the default handler back
    return subprocess.Popen([sys.executable, "-m", "effai", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the command to reach the point under test"
        time.sleep(0.05)


def _interrupted(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err[-2000:])
    last = json.loads(out.strip().splitlines()[-1])
    assert last["exit_code"] == 130 and last["ok"] is False and last.get("interrupted") is True
    assert "Traceback" not in err
    return last


def test_ctrl_c_on_export_ends_with_the_json_line_and_leaves_nothing(tmp_path):
    out, tmpdir = tmp_path / "art", tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = _start(["export", "ghostnetv3_050.digits", "--target", "onnx", "--out", str(out)], {"TMPDIR": str(tmpdir)})
    _wait_for(lambda: any(p.name.startswith(".art.tmp-") for p in tmp_path.iterdir()) or proc.poll() is not None)
    _interrupted(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmpdir"]           # no artifact, no temp dir
    assert all(p.stat().st_size > 0 for p in tmpdir.glob("effai-export-*.log"))  # no empty log kept


def test_a_killed_exports_temp_dir_is_removed_by_the_next_one(tmp_path):
    from effai.export import artifact_dir
    from effai.files import remove_stale

    out = tmp_path / "art"
    proc = _start(["export", "ghostnetv3_050.digits", "--target", "onnx", "--out", str(out)])
    _wait_for(lambda: any(p.name.startswith(".art.tmp-") for p in tmp_path.iterdir()) or proc.poll() is not None)
    proc.kill()
    proc.communicate(timeout=60)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp-")]
    assert left, "the killed export left no temp dir: nothing to test"
    live = tmp_path / f".art.tmp-{os.getpid()}-0123abcd"      # a running export's temp dir (this process: alive)
    live.mkdir()
    other = tmp_path / f".other.tmp-{left[0].name.split('-')[1]}-0123abcd"   # another --out's: not ours to touch
    other.mkdir()
    tmp = artifact_dir.prepare(out)                           # what the next export does first
    assert sorted(remove_stale(out)) == [] and not any(p.exists() for p in left)
    assert live.is_dir() and other.is_dir() and tmp.is_dir()


def test_ctrl_c_on_train_with_two_ranks_ends_with_the_json_line(tmp_path, digits_npz):
    out = tmp_path / "run"
    proc = _start(["train", "supervised", "--data", str(digits_npz), "--student", "resnet10t", "--input-size", "32",
                   "--batch-size", "32", "--epochs", "50", "--nproc", "2", "--out", str(out)])
    _wait_for(lambda: (out / "metrics.jsonl").is_file() or proc.poll() is not None, timeout=300)
    _interrupted(proc)
    assert not list(out.glob(".*.tmp-*"))


def test_a_full_disk_while_checkpointing_is_one_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import torch

    from effai.train import checkpoint as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"step": 1}, path)

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(EffaiError, match=r"disk full while writing .*checkpoint.pt \(the previous one is intact\)"):
        ckpt.save_atomic({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
