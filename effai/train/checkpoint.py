"""Atomic checkpoints (temp file + rename) that load with torch.load(weights_only=True), and the metrics log kept
consistent with them across a crash and resume."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effai.errors import EffaiError, UsageError
from effai.files import atomic_write


def writable_run_dir(out: Path) -> None:
    """Create the run directory `out` and prove it writable, or a UsageError naming the fix."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror}; choose a writable directory") from e


def refuse_existing_run(out: Path, *, finished: Path, started: tuple[Path, ...], resume: bool, force: bool,
                        finished_as: str = "a finished training run", started_as: str = "a training run",
                        resume_flag: str = "--set resume=true") -> None:
    """Before a run writes into `out`: a finished run there (`finished` exists) is kept unless --force; a started
    one (any of `started` exists) is kept unless resuming or --force. UsageError naming the way on."""
    if force:
        return
    if finished.exists():
        raise UsageError(f"{out} already holds {finished_as}; pass --force to start over, or choose another --out")
    if any(p.exists() for p in started) and not resume:
        raise UsageError(f"{out} already holds {started_as}; pass {resume_flag} to continue it, --force to start "
                         "over, or choose another --out")


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "model.safetensors", "train_record.json")


def prepare_run_dir(out: Path, force: bool, names: tuple[str, ...] = RUN_FILES, dirs: tuple[str, ...] = ()) -> None:
    """Make `out` a writable run dir; a --force run also removes what an earlier run left there (`names`, `dirs`).
    Called once the inputs are checked, so a bad option never costs the old run."""
    writable_run_dir(out)
    if not force:
        return
    for name in names:
        (out / name).unlink(missing_ok=True)
    for name in dirs:
        shutil.rmtree(out / name, ignore_errors=True)


def check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path,
                   ignore: tuple[str, ...] = ("resume",)) -> None:
    """A resumed run must have the settings of the run that wrote `path` (keys in `ignore` may differ)."""
    differ = sorted(k for k in now if k not in ignore and saved.get(k) != now[k])
    if differ:
        raise UsageError(f"{path} was written by a run with other settings ({', '.join(differ)}); resume with the "
                         "same options, or pass --force to start over")


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file, then rename: a crash or a full disk leaves the previous checkpoint, no temp file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise


def write_error(e: OSError, path: Path) -> EffaiError:
    """A failed write of a run's file as one line: what failed, that the previous file is intact, the fix."""
    import errno

    kept = "the previous one is intact" if path.exists() else "nothing was written"
    if e.errno == errno.ENOSPC:
        return EffaiError(f"disk full while writing {path} ({kept}); free space and rerun with --resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UsageError(f"cannot write {path}: {e.strerror} ({kept}); choose a writable --out")
    return EffaiError(f"writing {path} failed: {e.strerror or e} ({kept})")


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot resume from {path}: {e}; delete it to start over") from e


def truncate_metrics(path: Path, key: str, last: int | None) -> None:
    """Keep only the rows of a JSONL metrics log whose `key` (epoch, iteration) is <= `last`, the checkpoint's own
    counter (None: no checkpoint, drop the whole log); rewritten atomically, untouched when nothing changes.

    A loop appends a row and THEN checkpoints. A crash between the two (or during the append) leaves a row, or a torn
    line, for work the checkpoint does not hold; resume redoes that work and appends its row again, so the rows
    beyond the checkpoint are dropped here first. The other order (checkpoint, then row) loses the row of work the
    checkpoint already holds, which resume never recomputes: row first + truncate on resume is the order that ends
    with exactly one row per epoch, in order, whichever point the crash hits."""
    if last is None:
        path.unlink(missing_ok=True)
        return
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue                            # a line torn by a crash mid-write
        if isinstance(row, dict) and isinstance(row.get(key), int) and row[key] <= last:
            kept.append(line)
    if kept != lines:
        atomic_write(path, "".join(f"{line}\n" for line in kept))


def write_model(path: Path, model: torch.nn.Module, card: dict[str, Any], record: dict[str, Any],
                labels: list[str] | None = None, **meta: Any) -> Path:
    """The one format effai's trainers write: `model.safetensors` whose metadata carries the model card (`effai.card`,
    which `effai export --weights` rebuilds the model from), the class names (`labels`), the training record
    (`effai.train`) and any other `effai.<key>` entries given as keywords (JSON). Written atomically."""
    from safetensors.torch import save_file

    header = {"effai.card": json.dumps(card), "effai.train": json.dumps(record),
              **({"labels": json.dumps(list(labels))} if labels is not None else {}),
              **{f"effai.{k}": json.dumps(v) for k, v in meta.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata=header)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    return path


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
