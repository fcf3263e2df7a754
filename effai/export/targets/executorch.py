"""ExecuTorch target: torch.export -> XNNPACK delegate -> .pte, run by the ExecuTorch Runtime for parity.

Every precision goes through XNNPACK, so every quantized op runs inside the delegate: int8 by PT2E static
quantization (XNNPACKQuantizer), int8-dynamic on nn.Linear only, int8-weight / int4-weight by executorch_weight_only.
`aten.hardsigmoid` is decomposed by effai (relu6(x + 3) / 6, exact) to keep one partition.
Per precision, and why: docs/quantization.md, "effai/export/targets/executorch.py".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import EffaiError, UsageError
from effai.export import executorch_weight_only as weight_only
from effai.export.metadata import ModelInfo
from effai.export.targets.base import (TARGETS, LayerRule, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)

# Ops that carry no compute when left outside the delegate (tuple indexing of the delegate's outputs).
_BOOKKEEPING = {"getitem"}


class ExecuTorchTarget:
    name = "executorch"
    description = "ExecuTorch .pte with the XNNPACK delegate (Android/iOS/Linux CPU)"
    precisions = ("fp32", "int8", "int8-dynamic", "int8-weight", "int4-weight")
    unsupported: dict[str, str] = {}
    needs_exported_program = True
    quantizes = {p: LayerRule(frozenset({"linear"})) for p in ("int8-dynamic", "int8-weight", "int4-weight")}

    def available(self) -> tuple[bool, str]:
        return require(("executorch", "executorch"), extra="executorch")

    def lower(self, exported: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        outs = _flat_meta(exported)
        exported = decompose_for_xnnpack(exported)
        quant, partitioner = None, None
        if options.precision in ("int8", "int8-dynamic"):
            exported, quant = quantize_pt2e(exported, example_inputs, options)
        elif options.precision in weight_only.BITS:
            keep = quantize_filter(exported, set(options.float_layers))
            exported, quant = weight_only.quantize_weight_only(exported, example_inputs, options.precision, keep)
            quant["float_layers"] = sorted(options.float_layers)
            partitioner = weight_only.weight_only_partitioner()
        edge = to_edge_transform_and_lower(exported, partitioner=[partitioner or XnnpackPartitioner()])
        delegation = delegation_summary(edge.exported_program().graph_module)
        program = edge.to_executorch()
        path = out_dir / "model.pte"
        path.write_bytes(program.buffer)
        warnings = [f"{n} {op} node(s) run outside XNNPACK (portable kernels, slower)"
                    for op, n in delegation["non_delegated_ops"].items() if op not in _BOOKKEEPING]
        if quant and quant.get("weights_covered", 1.0) < 0.5:
            warnings.append(f"{options.precision} covers only {quant['weights_covered']:.0%} of the weights: it "
                            "quantizes nn.Linear layers (XNNPACK has no weight-only convolution) not kept float; "
                            "for a CNN use int8")
        if delegation["partitions"] > 1:
            warnings.append(f"the graph splits into {delegation['partitions']} XNNPACK partitions; layout copies "
                            "sit between them")
        details: dict[str, Any] = {"backend": "XnnpackBackend", "delegation": delegation, "warnings": warnings}
        if quant:
            details["quantization"] = quant
        return Lowered(
            model_file=path.name,
            inputs=[TensorSpec(n, tuple(x.shape), _dt(x.dtype)) for n, x in zip(options.input_names, example_inputs)],
            outputs=[TensorSpec(n, s, "float32", layout_for(s)) for n, s in zip(options.output_names, outs)],
            details=details,
        )

    metadata_modifies_model = False             # False: nothing to check before/after embedding

    def write_metadata(self, root: Path, lowered: Lowered, info: ModelInfo) -> dict[str, Any]:
        """The model's description in the model file, this format's native way (effai.export.metadata)."""
        return write_executorch(root, lowered, info)

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        import torch

        from effai.export.quiet import hush_loggers, runtime_quiet

        hush_loggers()   # executorch.runtime imports torchao, whose enums make torch's pytree warn on stderr
        from executorch.runtime import Runtime

        with runtime_quiet():   # XNNPACK's cpuinfo/threadpool lines at load_method: off the user's terminal
            method = Runtime.get().load_program(out_dir / lowered.model_file).load_method("forward")

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            outs = method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
            return [o.detach().numpy().copy() for o in outs]

        return Predictor("executorch-xnnpack", package_versions("executorch")["executorch"], run)

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> None:
        return None


def _hardsigmoid(x: Any) -> Any:
    import torch

    aten = torch.ops.aten
    return aten.div.Tensor(aten.hardtanh.default(aten.add.Tensor(x, 3.0), 0.0, 6.0), 6.0)


def _mean_keepdim(x: Any, dim: Any, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """mean(x, dims) without keepdim = view(mean(x, dims, keepdim=True)): XNNPACK's mean kernel (fp32 and int8)
    takes only the keepdim form over the spatial dims of a 4-D tensor; a classifier's `x.mean((2, 3))` otherwise
    stays outside the delegate in int8. The keepdim call itself is left as is (NotImplemented)."""
    import torch

    if keepdim or dtype is not None or x.dim() != 4:
        return NotImplemented
    y = torch.ops.aten.mean.dim(x, dim, True)
    dims = {d % 4 for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    return torch.ops.aten.view.default(y, [s for i, s in enumerate(x.shape) if i not in dims])


def decompose_for_xnnpack(exported: Any) -> Any:
    """hardsigmoid(x) = relu6(x + 3) / 6 with float scalars, so no dtype cast stays outside the delegate; and
    4-D means without keepdim as keepdim + view, the only form XNNPACK delegates."""
    import torch

    aten = torch.ops.aten
    table = {}
    for node in exported.graph.nodes:
        if node.target == aten.hardsigmoid.default:
            table[aten.hardsigmoid.default] = _hardsigmoid
        elif (node.target == aten.mean.dim and not (node.args[2:3] or [node.kwargs.get("keepdim", False)])[0]
              and len(getattr(node.args[0], "meta", {}).get("val", ()).shape
                      if hasattr(getattr(node.args[0], "meta", {}).get("val"), "shape") else ()) == 4):
            table[aten.mean.dim] = _mean_keepdim
    return exported.run_decompositions(table) if table else exported


def quantize_pt2e(exported: Any, example_inputs: tuple, options: LowerOptions) -> tuple[Any, dict[str, Any]]:
    """PT2E: annotate with XNNPACKQuantizer, observe calibration batches, convert to quantize/dequantize pairs that
    XNNPACK fuses into integer kernels. Layers named in options.float_layers are left unannotated (float)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torch import nn

    dynamic = options.precision == "int8-dynamic"
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    if dynamic:  # nn.Linear layers only: with dynamically quantized convs, XNNPACK 1.5.1 fails to load GhostNetV3
        # ("Failed to create static transpose node", invalid parameter); convs stay fp32 (use int8 for CNNs)
        quantizer = XNNPACKQuantizer().set_module_type(nn.Linear, config)
    else:
        quantizer = XNNPACKQuantizer().set_global(config)
    names = set(options.float_layers)
    keep = quantize_filter(exported, names)
    if keep is not None:
        quantizer.set_filter_function(keep)
    prepared = prepare_pt2e(exported.module(), quantizer)
    batch = example_inputs[0].shape[0]
    calibrated = 0
    if dynamic:  # no calibration, but one pass: the per-channel weight observers size their scales on it
        with torch.no_grad():
            prepared(*example_inputs)
    else:
        if options.calibration is None:
            raise UsageError("executorch int8 needs calibration data: pass --calib DIR|digits|photos")
        with torch.no_grad():
            for i in range(0, options.calibration.shape[0] - batch + 1, batch):
                prepared(torch.from_numpy(np.ascontiguousarray(options.calibration[i:i + batch])))
                calibrated += batch
    converted = convert_pt2e(prepared)
    requantized = torch.export.export(converted, example_inputs)
    q_nodes = sum(1 for n in requantized.graph.nodes if "dequantize_per_channel" in str(n.target))
    return requantized, {
        "scheme": "XNNPACK PT2E " + ("dynamic int8 of nn.Linear layers (per-channel weights, per-run "
                                     "activations; convolutions fp32)" if dynamic else
                                     "static int8 (per-channel weights, histogram-calibrated activations)"),
        "layers_quantized": q_nodes, "float_layers": sorted(names), "calibration_samples": calibrated,
    }


def quantize_filter(exported: Any, float_layers: set[str]) -> Any:
    """None, or a node filter that is False on the nodes of the modules named in `float_layers` (left float)."""
    if not float_layers:
        return None
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    known = {n for n, _ in exported.module().named_modules()}
    missing = sorted(float_layers - known)
    if missing:
        raise EffaiError(f"float layer(s) {missing[:3]} are not modules of the exported model")
    filters = [get_module_name_filter(n) for n in float_layers]
    return lambda node: not any(f(node) for f in filters)


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


# -------------------------------------------------------------------------------------------------- ExecuTorch

def write_executorch(root: Path, lowered: Any, info: ModelInfo) -> dict[str, Any]:
    """Nothing to write: the .pte format has no metadata section apps read. The artifact's manifest.json is the
    sidecar (preprocessing, labels, model, weights sha256 and licence)."""
    return {"format": "sidecar", "fields": [], "labels": "sidecar" if info.labels else "none",
            "sidecar": "manifest.json",
            "reason": ".pte has no metadata section apps read; ship manifest.json (preprocessing, labels, model, "
                      "weights sha256, licence) beside model.pte",
            "read_with": "any JSON reader: manifest.json `preprocessing`, `labels`, `model`"}


TARGETS.register("executorch", ExecuTorchTarget())
