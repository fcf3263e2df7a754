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
    """Send fds 1 and 2 to `log` (appending) for the duration of the block; Python warnings are silenced."""
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    target = open(log, "ab") if log is not None else tempfile.TemporaryFile()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:
        target.close()
        raise
    try:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _flush_c_stdio()    # C/C++ toolchains buffer stdout: flush it into the log, not into effai's output
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        target.close()


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# Python loggers of toolchains that warn on import, at WARNING, about their own internals (torch's pytree on
# torchao's enums, pulled in by executorch.runtime): not the user's concern, kept at ERROR.
NOISY_LOGGERS = ("torch.utils._pytree",)


def hush_loggers() -> None:
    """Raise the noisy toolchain loggers to ERROR (idempotent; call before importing executorch.runtime)."""
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def runtime_quiet(log: Path | None = None) -> Iterator[None]:
    """A runtime's load or first run with its C++ chatter (ExecuTorch's cpuinfo/threadpool lines, absl notes)
    sent to `log`, or dropped; Python exceptions still propagate."""
    hush_loggers()
    with captured(log):
        yield


def import_quietly(module: str) -> object:
    """Import a toolchain whose import prints to stderr (coremltools: version checks and "Failed to load
    _MLModelProxy" off macOS) with that output dropped; later imports are cached by Python and print nothing."""
    import importlib

    if module in sys.modules:
        return sys.modules[module]
    with runtime_quiet():
        return importlib.import_module(module)
