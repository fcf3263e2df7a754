"""One decision for every entry point (export, pack, devit export): does a target take a precision, and if not, why.

As ExecuTorch's recipes do, the (target, precision) pair is planned once, before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from effai.errors import UsageError, choices_hint
from effai.export.precisions import PRECISIONS


@dataclass(frozen=True)
class Plan:
    target: str
    precision: str               # the precision asked for, or the target's default
    ok: bool
    reason: str | None = None    # why the target does not take it (None when ok)


def plan(target: str, precision: str | None = None) -> Plan:
    """The plan for exporting to `target` at `precision` (None: the target's default). Unknown names are a
    UsageError listing the choices; a known precision the target does not take is a Plan with ok=False."""
    from effai.export.targets import TARGETS

    t = TARGETS.get(target)
    p = precision or t.precisions[0]
    if p not in PRECISIONS:
        raise UsageError(f"unknown --quantize '{p}'; {choices_hint(p, PRECISIONS.names())}")
    if p in t.precisions:
        return Plan(target, p, True)
    why = t.unsupported.get(p)
    return Plan(target, p, False, f"--quantize {p} is not supported by {target}" + (f" ({why})" if why else "")
                + f"; {target} takes: {', '.join(t.precisions)}")


def require(target: str, precision: str | None = None) -> str:
    """The precision to export `target` at, or the UsageError saying why the target does not take it."""
    p = plan(target, precision)
    if not p.ok:
        raise UsageError(p.reason)
    return p.precision
