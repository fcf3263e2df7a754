"""`effai devit run --local`: the whole collaborative run on this host, one process per device.

The coordinator runs in the calling process; each part runs in its own `python -m effai.cli_devit serve` process that
joins over TCP exactly as a remote device would (gloo, the same rendezvous and checks), so the run exercises the
real protocol. Device processes are always reaped: on success they exit by themselves; on any failure the ones
still running are terminated, then killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from effai.devit.parts import Decomposition
from effai.devit.runtime import RunResult, RunSpec, coordinate
from effai.errors import EffaiError


def run_local(decomp: Decomposition, run_dir: str | Path, spec: RunSpec, host: str = "127.0.0.1", port: int = 0,
              threads: int = 1, fail_after: dict[int, int] | None = None,
              part_paths: list[str | Path] | None = None) -> RunResult:
    """Coordinate here, one device process per part. `fail_after` {part: batches} (tests) makes a device die
    mid-stream; `part_paths` serves other checkpoints than run_dir/part_<i> (tests of the refusals)."""
    procs: list[tuple[int, subprocess.Popen, Path]] = []
    logs = Path(tempfile.mkdtemp(prefix="effai-devit-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def start(h: str, p: int) -> None:
        for i in range(decomp.fusion.parts):
            target = str(part_paths[i]) if part_paths else str(run_dir)
            cmd = [sys.executable, "-m", "effai.cli_devit", "serve", target, "--part", str(i),
                   "--coordinator", f"{h}:{p}", "--timeout", f"{spec.timeout_s:g}", "--threads", str(threads), "--json"]
            if fail_after and i in fail_after:
                cmd += ["--fail-after", str(fail_after[i])]
            log = logs / f"part_{i}.log"
            with open(log, "wb") as f:
                procs.append((i, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))

    def watch() -> None:
        for i, proc, log in procs:
            if proc.poll() is not None:
                raise EffaiError(f"device process for part {i} exited with code {proc.returncode} before joining: "
                                 f"{_tail(log)}")

    ok = False
    try:
        result = coordinate(decomp, f"{host}:{port}", spec, on_listening=start, watch=watch)
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


def _tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    return " | ".join(lines[-3:])[-400:] if lines else "(no output)"
