"""Atomic artifact directories: build everything in a temp dir beside the destination, rename at the end.

A failed or interrupted export leaves the destination as it was (absent, or the previous artifact).
"""

from __future__ import annotations

import errno
import re
import shutil
from typing import Any
from pathlib import Path

from effai.errors import EffaiError, UsageError
from effai.files import replace_dir, staging_dir
from effai.export.manifest import MANIFEST, SCHEMA
from effai.export.manifest import read as read_manifest


def is_artifact(path: Path) -> bool:
    """A directory effai wrote: its manifest.json parses and carries effai's schema (a web app's doesn't)."""
    import json

    try:
        return json.loads((path / MANIFEST).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def prepare(out: Path) -> Path:
    """Check `out` can be (re)placed and return a fresh temp dir next to it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not is_artifact(out):
        raise UsageError(f"refusing to replace {out}: it is not empty and not an effai artifact (no {MANIFEST} with "
                         f"schema {SCHEMA}); choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(out)
    except PermissionError as e:
        raise UsageError(f"cannot write to {out.parent}: permission denied; choose a writable --out") from e
    except OSError as e:
        raise UsageError(f"cannot create the output directory {out}: {e.strerror}; choose another --out") from e
    return tmp


def commit(tmp: Path, out: Path) -> None:
    """Move the finished temp dir into place, replacing a previous artifact only after the new one is complete."""
    replace_dir(tmp, out)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def io_error(e: OSError, out: Path) -> EffaiError:
    """A clear message for write failures (disk full, read-only file system, permissions)."""
    if e.errno == errno.ENOSPC:
        return EffaiError(f"disk full while writing the artifact for {out}; nothing was written there - free space "
                          "or choose another --out")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UsageError(f"cannot write the artifact for {out}: {e.strerror}; choose a writable --out")
    return EffaiError(f"writing the artifact for {out} failed: {e}; nothing was written there")


def safe_name(name: str) -> str:
    """A model name usable as one path component (names can come from a checkpoint's metadata)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "model"


def artifact_name(loaded: Any, target: str, precision: str, shape: tuple[int, ...],
                  io_dtype: str = "float") -> str:
    """`<model>-<target>[-<precision>][-<H>x<W>][-b<N>][-io-int8][-w<sha8>]`: what differs from the target's default
    precision, the card's input size, batch 1, float I/O and the card's own weights is in the name, so exports of
    different things never share a folder."""
    from effai.export.targets import TARGETS

    name = f"{safe_name(loaded.card.name)}-{target}"
    if precision != TARGETS.get(target).precisions[0]:
        name += f"-{precision}"
    if tuple(shape[2:]) != tuple(loaded.card.input_size[1:]):
        name += f"-{shape[2]}x{shape[3]}"
    if shape[0] != 1:
        name += f"-b{shape[0]}"
    if io_dtype != "float":
        name += f"-io-{io_dtype}"
    src = loaded.weights.source
    bundled = bool(loaded.card.bundled_weights) and Path(src).name == loaded.card.bundled_weights
    if not (loaded.random_init or bundled or src.startswith(("bundled:", "timm-hub:"))):
        name += f"-w{loaded.weights.sha256[:8]}"
    return name


def identity(loaded: Any, target: str, precision: str, shape: tuple[int, ...],
             io_dtype: str) -> dict[str, Any]:
    """What makes two artifacts the same export (re-exporting it over itself is a silent update)."""
    return {"model": loaded.card.name, "weights_sha256": loaded.weights.sha256, "target": target,
            "precision": precision, "input_shape": list(shape), "io_dtype": io_dtype}


def manifest_identity(m: dict[str, Any]) -> dict[str, Any]:
    """`identity` of the artifact a manifest describes."""
    try:
        return {"model": m["model"]["name"], "weights_sha256": m["model"]["weights_sha256"], "target": m["target"],
                "precision": m["precision"], "input_shape": list(m["inputs"][0]["shape"]),
                "io_dtype": (m.get("export_config") or {}).get("io_dtype", "float")}
    except (KeyError, TypeError, IndexError):
        return {}


def check_replace(out: Path, new: dict[str, Any], force: bool) -> str | None:
    """An artifact at `out` exported from something else (model, weights, target, precision, input shape, I/O
    dtype) is replaced only with force, and then said so; re-exporting the same thing updates it silently."""
    if not is_artifact(out):
        return None
    try:
        old = manifest_identity(read_manifest(out))
    except EffaiError:
        old = {}
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if not diff:
        return None
    if not force:
        raise UsageError(f"{out} holds another export ({'; '.join(diff)}); pass --force to replace it, or choose "
                         "another --out (the default name already tells such exports apart)")
    return f"replaced the artifact at {out} ({'; '.join(diff)})"
