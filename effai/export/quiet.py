"""Toolchains print a lot (litert-torch progress, absl logs, tqdm bars, C++ cpuinfo notes). effai captures it at
the file-descriptor level into a log so that effai's own stdout stays parseable; the log is kept for debugging.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def captured(log: Path | None) -> Iterator[None]:
    """Send fds 1 and 2 (and Python warnings) to `log` (appending) for the duration of the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    target = open(log, "ab") if log is not None else tempfile.TemporaryFile()
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        target.close()


def tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
