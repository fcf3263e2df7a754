"""torch.export with errors a user can act on: what failed, where in their code, and how to fix it."""

from __future__ import annotations

from typing import Any

import torch

from effai.export.diagnose import trace_error

def trace(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """torch.export.export (non-strict) of an eval-mode model; raises EffaiError naming the failing op and line."""
    try:
        return torch.export.export(model.eval(), example_inputs, strict=False)
    except Exception as e:  # torch raises many types here; all become one clear message
        raise trace_error(e) from e
