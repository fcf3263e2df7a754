"""The two kinds of failure every effai entry point distinguishes (CLI exit codes 2 and 1)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EffaiError(Exception):
    """A failure with a one-line message that names the problem and the fix. CLI exit code 1."""

    exit_code = 1


class UsageError(EffaiError):
    """Bad input from the user: unknown name, missing path, malformed option, unloadable file. Exit code 2."""

    exit_code = 2


def choices_hint(name: str, choices: Iterable[str]) -> str:
    """'did you mean X? choose one of: a, b, c' for an unknown name."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    shown = ", ".join(choices) if len(choices) <= 30 else ", ".join(choices[:30]) + f", ... ({len(choices)} in all)"
    return f"{hint}choose one of: {shown}"
