"""Which targets can take the operator another target refused? Lower a one-operator probe and see.

The probe is the failing operator alone, called on random tensors with the shapes and dtypes it has in the user's
model (read from torch.export's graph), lowered by each other available target into a scratch directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effai.export.targets.base import LowerOptions


class _Probe(nn.Module):
    def __init__(self, op: Any, template: Any) -> None:
        super().__init__()
        self.op, self.template = op, template

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)

        def fill(a: Any) -> Any:
            if a is _SLOT:
                return next(it)
            if isinstance(a, (list, tuple)):
                return type(a)(fill(x) for x in a)
            return a

        out = self.op(*fill(self.template))
        return out if isinstance(out, torch.Tensor) else tuple(o for o in out if isinstance(o, torch.Tensor))


_SLOT = object()


def probe_for(program: Any, op_name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]] | None:
    """A module calling `op_name` (e.g. 'aten.erfinv') like the first such node of `program`, with example inputs."""
    short = op_name.split(".", 1)[-1]
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "name", lambda: node.target)())   # 'aten::erfinv'
        if name.replace("::", ".") != op_name and name.split("::")[-1] != short:
            continue
        tensors: list[torch.Tensor] = []

        def convert(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                val = a.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    raise ValueError("non-tensor node argument")
                shape = tuple(int(s) for s in val.shape)
                t = torch.randn(shape) * 0.5 if val.dtype.is_floating_point else torch.zeros(shape, dtype=val.dtype)
                tensors.append(t.to(val.dtype))
                return _SLOT
            if isinstance(a, (list, tuple)):
                return type(a)(convert(x) for x in a)
            return a

        try:
            template = convert(tuple(node.args))
        except ValueError:
            return None
        if node.kwargs or not tensors:
            return None
        return _Probe(node.target, template).eval(), tuple(tensors)
    return None


def targets_taking(model: nn.Module, example: tuple[torch.Tensor, ...], op_name: str,
                   candidates: dict[str, Any]) -> dict[str, bool] | None:
    """{target: lowered the probe?} for each candidate, or None when no probe could be built."""
    try:
        program = torch.export.export(model.eval(), example, strict=False)
        built = probe_for(program, op_name)
        if built is None:   # the toolchain may name the op after decomposition (special_erfinv -> erfinv)
            built = probe_for(program.run_decompositions(), op_name)
    except Exception:
        return None
    if built is None:
        return None
    probe, inputs = built
    result = {}
    for name, target in candidates.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                arg = torch.export.export(probe, inputs, strict=False) if target.needs_exported_program else probe
                target.lower(arg, inputs, LowerOptions(output_names=("out",)), Path(tmp))
                result[name] = True
            except Exception:
                result[name] = False
    return result
