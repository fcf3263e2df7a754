"""`effai train --nproc N`: N local ranks with no network-reachable rendezvous.

effai starts the ranks itself (torch.multiprocessing, spawn); they meet through a FileStore in a private (0700) temp
dir and run gloo (NCCL's bootstrap on GPU) on the loopback interface only, so no peer on the network can reach a
store or unpickle anything into it. Rank 0 alone reports; the first rank's error is the run's one error line.
Multi-node training is the user's explicit `torchrun` (see docs/security.md for what that exposes).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from effai.errors import EffaiError, UsageError

STORE_ENV = "EFFAI_DDP_STORE"     # path of the FileStore, set by the launcher in each rank


def loopback_ifname() -> str:
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS/BSD)."""
    names = [n for _, n in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise EffaiError(f"no loopback interface among {', '.join(names) or 'none'}; local multi-process training "
                     "needs one (it binds gloo to loopback only)")


def rank_env(rank: int, world: int, store: str, ifname: str) -> dict[str, str]:
    """What one rank sees: its place in the group, the store, loopback-only sockets, its share of the cores."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), STORE_ENV: store,
           "GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    return env


def _rank_main(rank: int, world: int, store: str, ifname: str, cfg: Any, resume: bool, force: bool,
               show_progress: bool, results: Any) -> None:
    """One rank: train, send rank 0's result (or any rank's error) to the launcher over its own pipe."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, _interrupt)      # torch stops the other ranks with SIGTERM: clean up as on Ctrl-C
    os.environ.update(rank_env(rank, world, store, ifname))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from effai import console
    from effai.train.loop import train

    progress = None
    if show_progress and rank == 0:
        from effai.train.progress import RichProgress

        progress = RichProgress(console.err())
    try:
        result = train(cfg, resume=resume, force=force, progress=progress)
        if rank == 0:
            results.put(("ok", rank, result))
    except KeyboardInterrupt:
        sys.exit(130)
    except EffaiError as e:
        results.put(("error", rank, (e.exit_code, str(e))))
        sys.exit(e.exit_code)
    except Exception as e:   # reported once by the launcher as an internal error of this rank
        results.put(("error", rank, (1, f"internal error in rank {rank}: {type(e).__name__}: {e}")))
        sys.exit(1)


def run_local(cfg: Any, nproc: int, *, resume: bool, force: bool, show_progress: bool) -> dict[str, Any]:
    """Train `cfg` on `nproc` local ranks; returns rank 0's result or raises the first rank's error."""
    import logging

    import torch.multiprocessing as mp

    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)   # "Terminating process ..." noise
    ifname = loopback_ifname()
    tmp = tempfile.mkdtemp(prefix="effai-ddp-")           # 0700: only this user can reach the store
    store = os.path.join(tmp, "store")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_rank_main, args=(nproc, store, ifname, cfg, resume, force, show_progress, results),
                               nprocs=nproc, join=False, start_method="spawn")
    reports: list[tuple[str, int, Any]] = []
    try:
        try:
            while not procs.join(timeout=0.5):
                reports += _drain(results)      # read as they come: a full pipe would block the rank
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            reports += _drain(results)
            errors = sorted((r for r in reports if r[0] == "error"), key=lambda r: r[1])
            if errors:
                code, message = errors[0][2]
                raise (UsageError if code == 2 else EffaiError)(message) from None
            rank = getattr(e, "error_index", "?")
            raise EffaiError(f"training rank {rank} exited with code {getattr(e, 'exit_code', '?')} before "
                             "reporting why (killed? out of memory?)") from None
        reports += _drain(results)
    except KeyboardInterrupt:
        _stop(procs.processes)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = [r[2] for r in reports if r[0] == "ok"]
    if not ok:
        raise EffaiError("training ranks finished without rank 0's result; rerun with --nproc 1 to see why")
    return ok[0]


def _stop(processes: list[Any], grace_s: float = 10.0) -> None:
    """Ctrl-C: every rank gets SIGINT (they finish the file they are writing and exit), then SIGTERM, then SIGKILL."""
    import signal
    import time

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if p.is_alive()]
        for p in alive:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGINT else 5.0)
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _drain(queue: Any) -> list[tuple[str, int, Any]]:
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out
