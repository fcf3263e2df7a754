"""`effai devit run --local`: the whole collaborative run on this host, one process per device.

The coordinator runs in the calling process; each part runs in its own `python -m effai devit serve` process that
joins over TCP exactly as a remote device would, so the run exercises the real protocol. Token, early failures and
reaping: docs/distill.md, "effai/devit_runtime/local.py".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from effai.devit_runtime.parts import Decomposition
from effai.devit_runtime import channel
from effai.devit_runtime.coordinator import RunResult, coordinate
from effai.devit_runtime.messages import RunSpec
from effai.devit_runtime.network import DeviceExited, format_address


def run_local(decomp: Decomposition, run_dir: str | Path, spec: RunSpec, host: str = "127.0.0.1", port: int = 0,
              threads: int = 1, fail_after: dict[int, int] | None = None,
              part_paths: list[str | Path] | None = None) -> RunResult:
    """Coordinate here, one device process per part. `fail_after` {part: batches} (tests) makes a device die
    mid-stream; `part_paths` serves other checkpoints than run_dir/part_<i> (tests of the refusals)."""
    procs: list[tuple[int, subprocess.Popen, Path]] = []
    logs = Path(tempfile.mkdtemp(prefix="effai-devit-"))
    token = channel.new_token()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), channel.TOKEN_ENV: token}

    def start(h: str, p: int) -> None:
        for i in range(decomp.fusion.parts):
            target = str(part_paths[i]) if part_paths else str(run_dir)
            cmd = [sys.executable, "-m", "effai", "devit", "serve", target, "--part", str(i),
                   "--coordinator", format_address(h, p), "--timeout", f"{spec.timeout_s:g}", "--threads", str(threads),
                   "--json"]
            if not spec.send_images:
                cmd += ["--data", spec.data]
            if fail_after and i in fail_after:
                cmd += ["--fail-after", str(fail_after[i])]
            log = logs / f"part_{i}.log"
            with open(log, "wb") as f:
                procs.append((i, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))

    def watch() -> None:   # called by the coordinator until every device is in the run, and when the group fails
        for i, proc, log in procs:
            if proc.poll() is not None:
                raise DeviceExited(f"device rank {i + 1} (part {i}, pid {proc.pid}) exited with code "
                                   f"{proc.returncode} before joining the run: {_last_error(log)} (its log: {log})",
                                   rank=i + 1)

    ok = False
    try:
        result = coordinate(decomp, format_address(host, port), spec, token=token, on_listening=start,
                            watch=watch)
        ok = True
        return result
    finally:
        for _, proc, _ in procs:
            try:   # after a failure the others get a closed connection and exit; don't wait long for them
                proc.wait(timeout=spec.timeout_s if ok else 3)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if ok:
            shutil.rmtree(logs, ignore_errors=True)


def _last_error(log: Path) -> str:
    """The device's own one-line error: the `error` of its last line when that is `serve --json`'s failure object,
    else the last line it wrote (a traceback's ends with the exception)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    if not lines:
        return "(no output)"
    try:
        last = json.loads(lines[-1])
    except json.JSONDecodeError:
        return lines[-1][-400:]
    return str(last["error"])[-400:] if isinstance(last, dict) and last.get("error") else lines[-1][-400:]
