"""ExecuTorch target: torch.export -> XNNPACK delegate -> .pte, run by the ExecuTorch Runtime for parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import EffaiError
from effai.export.targets.base import (TARGETS, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)


class ExecuTorchTarget:
    name = "executorch"
    description = "ExecuTorch .pte with the XNNPACK delegate (Android/iOS/Linux CPU)"
    precisions = ("fp32",)
    needs_exported_program = True

    def available(self) -> tuple[bool, str]:
        return require(("executorch", "executorch"), extra="executorch")

    def lower(self, exported: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        delegation = delegation_summary(edge.exported_program().graph_module)
        program = edge.to_executorch()
        path = out_dir / "model.pte"
        path.write_bytes(program.buffer)
        outs = [o for o in _flat_meta(exported)]
        return Lowered(
            model_file=path.name,
            inputs=[TensorSpec(n, tuple(x.shape), _dt(x.dtype)) for n, x in zip(options.input_names, example_inputs)],
            outputs=[TensorSpec(n, s, "float32", layout_for(s)) for n, s in zip(options.output_names, outs)],
            details={"backend": "XnnpackBackend", "delegation": delegation},
        )

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        import torch
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(out_dir / lowered.model_file).load_method("forward")

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            outs = method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
            return [o.detach().numpy().copy() for o in outs]

        return Predictor("executorch-xnnpack", package_versions("executorch")["executorch"], run)

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> None:
        return None


def delegation_summary(graph_module: Any) -> dict[str, Any]:
    """Partitions and delegated / non-delegated ops by type, from ExecuTorch's own backend_debug."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    non_delegated: dict[str, int] = {}
    delegated: dict[str, int] = {}
    for op, row in info.delegation_by_operator.items():
        if row.delegated:
            delegated[op] = row.delegated
        if row.non_delegated:
            non_delegated[op] = row.non_delegated
    return {"partitions": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
            "non_delegated_nodes": info.num_non_delegated_nodes, "delegated_ops": delegated,
            "non_delegated_ops": non_delegated}


def _flat_meta(exported: Any) -> list[tuple[int, ...]]:
    out_node = next(n for n in exported.graph.nodes if n.op == "output")
    vals = out_node.args[0]
    vals = vals if isinstance(vals, (list, tuple)) else [vals]
    shapes = []
    for v in vals:
        val = v.meta.get("val") if hasattr(v, "meta") else None
        if val is None:
            raise EffaiError("exported program has an output without shape information")
        shapes.append(tuple(int(d) for d in val.shape))
    return shapes


def _dt(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


TARGETS.register("executorch", ExecuTorchTarget())
