"""Turn toolchain exceptions into one line a user can act on: the failing operator, where in their code, the fix."""

from __future__ import annotations

import re
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from effai.errors import EffaiError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Where each toolchain names the operator it cannot handle, most specific first.
_OP_PATTERNS = (
    r"op='([\w.]+)', overload='\w+'",                                   # torch.onnx dispatcher
    r"Lowering not found: (?:aten\.)?([\w]+)",                         # litert-torch
    r"Operator torch\._ops\.aten\.(\w+)\.\w+ is not in Core ATen",      # executorch
    r"convert function for op '(\w+)' not implemented",                 # coremltools
    r"Torch `(\w+)` op",                                                # coremltools
    r"EdgeOpOverload: aten\.(\w+)",                                     # executorch dtype checks
    r"aten(?:::|\.)(\w+)",                                              # anything else that names an aten op
)

_TRACE_HINTS = (
    (r"data-dependent|GuardOnDataDependent",
     "a Python branch or .item() on a tensor value; use torch.where / torch.cond, or decide it outside forward()"),
    (r"\.numpy\(\)|numpy", "a call into numpy inside forward(); use the torch equivalent"),
    (r"Unsupported|not supported", "an operation torch.export does not support; rewrite it with standard torch ops"),
)


def failing_op(text: str) -> str | None:
    text = _ANSI.sub("", text)
    for pat in _OP_PATTERNS:
        m = re.search(pat, text)
        if m:
            op = m.group(1)
            return op if "." in op else f"aten.{op}"
    return None


def user_frame(e: BaseException, text: str) -> str | None:
    """The user's own source line the error points at (from the message, else from the traceback)."""
    m = re.search(r'File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.+)', text)
    if m and "site-packages" not in m.group(1):
        return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: `{m.group(4).strip()}`"
    stdlib = sysconfig.get_paths()["stdlib"]
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "site-packages" not in f.filename and "/torch/" not in f.filename and "/effai/" not in f.filename
              and not f.filename.startswith(stdlib) and not f.filename.startswith("<")]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"
    return None


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return lines[0][:240] if lines else ""


def trace_error(e: BaseException) -> EffaiError:
    text = _ANSI.sub("", str(e))
    where = user_frame(e, text)
    hint = next((h for pat, h in _TRACE_HINTS if re.search(pat, f"{type(e).__name__} {text}")), "see the message")
    at = f" at {where}" if where else ""
    return EffaiError(f"torch.export cannot trace the model{at}: {first_line(text) or type(e).__name__} ({hint}); "
                      "export needs a traceable forward()")


def lowering_error(target: str, e: BaseException, log: Path | None, others: list[str],
                   probe: Any = None) -> EffaiError:
    """Name the operator a target choked on, where the user's code uses it, and which other targets take it.

    `probe(op) -> {target: bool} | None` lowers that operator alone on the other targets (effai.export.op_probe)."""
    text = _ANSI.sub("", str(e))
    log_text = log.read_text(errors="replace")[-20000:] if log is not None and log.is_file() else ""
    op = failing_op(text) or failing_op(log_text)
    where = user_frame(e, text)
    what = f"operator {op} is not supported" if op else (first_line(text) or type(e).__name__)
    at = f" (used at {where})" if where else ""
    line = first_line(text)
    generic = line.startswith("Failed to convert the exported program")  # torch.onnx's boilerplate opener
    detail = f" [{line}]" if op and line and not generic and op.split(".")[-1] not in line else ""
    verdict = probe(op) if (op and probe is not None) else None
    if verdict:
        can = [t for t, ok in verdict.items() if ok]
        tail_ = (f"targets that take {op} (probed alone with its shapes here): {', '.join(can)}" if can
                 else f"no other installed target takes {op} either (probed: {', '.join(verdict)}); rewrite it "
                      "with standard ops")
    else:
        tail_ = (f"other targets to try: {', '.join(others) or 'none installed'} (--target all shows which of them "
                 "take the model)")
    return EffaiError(f"{target} cannot lower this model: {what}{at}{detail}; {tail_}")
