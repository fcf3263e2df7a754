"""Atomic artifact directories: build everything in a temp dir beside the destination, rename at the end.

A failed or interrupted export leaves the destination as it was (absent, or the previous artifact).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from effai.errors import EffaiError, UsageError
from effai.files import replace_dir, staging_dir
from effai.export.manifest import MANIFEST, SCHEMA


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
