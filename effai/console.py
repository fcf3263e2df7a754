"""Console output shared by CLI commands: rich progress on stderr, tables on stdout, one JSON line at the end.

Both consoles write to duplicates of the original file descriptors, so toolchain output captured at the fd level
(effai.export.quiet) never mixes with effai's own output.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

_err: Console | None = None
_out: Console | None = None
_json_written = False


def err() -> Console:
    global _err
    if _err is None:
        _err = Console(file=os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1), stderr=True,
                       highlight=False, soft_wrap=False)
    return _err


def out() -> Console:
    global _out
    if _out is None:
        _out = Console(file=os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1), highlight=False)
    return _out


def json_line(obj: dict[str, Any]) -> None:
    """The last stdout line of every command: one JSON object."""
    global _json_written
    _json_written = True
    out().file.write(json.dumps(obj, default=str, separators=(",", ":")) + "\n")
    out().file.flush()


def reset() -> None:
    """Forget the consoles (tests run many commands in one process with changing stdout)."""
    global _err, _out, _json_written
    _err = _out = None
    _json_written = False


def json_written() -> bool:
    """Whether this command has printed its JSON line (an interrupted command that has not still owes one)."""
    return _json_written
