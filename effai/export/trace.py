"""torch.export with errors a user can act on: what failed, where in their code, and how to fix it."""

from __future__ import annotations

import re
import traceback
from typing import Any

import torch

from effai.errors import EffaiError

_HINTS = (
    (r"data-dependent|GuardOnDataDependent",
     "a Python branch or .item() on a tensor value; use torch.where / torch.cond, or decide it outside forward()"),
    (r"\.numpy\(\)|numpy", "a call into numpy inside forward(); use the torch equivalent"),
    (r"Unsupported|not supported", "an operation torch.export does not support; rewrite it with standard torch ops"),
)


def trace(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """torch.export.export (non-strict) of an eval-mode model; raises EffaiError naming the failing op and line."""
    try:
        return torch.export.export(model.eval(), example_inputs, strict=False)
    except Exception as e:  # torch raises many types here; all become one clear message
        raise trace_error(e) from e


def trace_error(e: BaseException) -> EffaiError:
    text = str(e)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    where = _user_frame(e, text)
    hint = next((h for pat, h in _HINTS if re.search(pat, f"{type(e).__name__} {text}")), "see the message above")
    at = f" at {where}" if where else ""
    return EffaiError(f"torch.export cannot trace the model{at}: {first} ({hint}); export needs a traceable forward()")


def _user_frame(e: BaseException, text: str) -> str | None:
    m = re.search(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.+)', text)
    if m:
        return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: `{m.group(4).strip()}`"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "site-packages" not in f.filename and "/torch/" not in f.filename and "/effai/" not in f.filename]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"
    return None
