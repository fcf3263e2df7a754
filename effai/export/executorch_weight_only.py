"""Weight-only int8 / int4 for ExecuTorch: per-channel nn.Linear weights, float compute, in XNNPACK's f32-qc8w/qc4w.

    W_q = clamp(round(W / s_c), -2^(b-1), 2^(b-1) - 1),  s_c = max|W_c| / ((2^b - 1) / 2);   y = x (s * W_q)^T + bias

ExecuTorch 1.5.1 has the kernels but no path to them; three steps (none patches executorch) close the gap:
`split_linear_bias`, `WeightOnlyLinearQuantizer`, `weight_only_partitioner`. Why each: docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from effai.errors import EffaiError

BITS = {"int8-weight": 8, "int4-weight": 4}


def split_linear_bias(graph_module: Any, select: Any = None) -> int:
    """Rewrite aten.linear(x, W, b) as aten.linear(x, W) + b in place, for the linears `select(node)` accepts (None:
    all); returns how many were split. Linears left float keep their fused bias."""
    import torch

    linear, n_split = torch.ops.aten.linear.default, 0
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != linear or len(node.args) < 3 or node.args[2] is None:
            continue
        if select is not None and not select(node):
            continue
        x, w, b = node.args[:3]
        with graph.inserting_after(node):
            add = graph.call_function(torch.ops.aten.add.Tensor, (node, b))
        node.replace_all_uses_with(add)
        add.args = (node, b)                 # replace_all_uses_with also rewired the add's own input
        node.args = (x, w)
        if "val" in node.meta:
            add.meta["val"] = node.meta["val"]
        n_split += 1
    graph.lint()
    graph_module.recompile()
    return n_split


def weight_only_config(bits: int) -> Any:
    """XNNPACK's symmetric per-channel weight spec at `bits`, with no activation quantization."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    base = get_symmetric_quantization_config(is_per_channel=True)
    config = dataclasses.replace(base, input_activation=None, output_activation=None)
    if bits == 4:
        config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=-8, quant_max=7))
    return config


def annotate_linears(graph_module: Any, config: Any, keep: Any = None) -> None:
    """Annotate the weights of the linears whose weight is a stored parameter (XNNPACK's own linear annotator; a
    weight computed in the graph has no constant to quantize); `keep(node)` False leaves a node float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import OP_TO_ANNOTATOR

    OP_TO_ANNOTATOR["linear"](graph_module, config, quantized_linear(keep))


def quantized_linear(keep: Any = None) -> Any:
    """The linears weight-only quantizes: a stored weight (a computed one has no constant to quantize), not kept
    float by `keep`."""
    def select(node: Any) -> bool:
        return len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr" and (keep is None or keep(node))
    return select


def make_quantizer(config: Any, keep: Any = None) -> Any:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class WeightOnlyLinearQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer.annotate fails on a config without activation quantization; annotate directly."""

        def annotate(self, model: Any) -> Any:
            annotate_linears(model, config, keep)
            return model

    return WeightOnlyLinearQuantizer()


def weight_only_partitioner() -> Any:
    """An XnnpackPartitioner whose LinearConfig also claims dq(weight) @ float input (f32-qc8w / f32-qc4w)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.backends.xnnpack.utils.utils import get_input_node

    hooks = ("_get_act_deps", "_get_output_deps", "weight_idx", "act_idx")
    probe = LinearConfig()
    if not all(hasattr(probe, h) for h in hooks):
        raise EffaiError("this executorch's XNNPACK LinearConfig lacks the hooks effai's weight-only partitioner "
                         f"extends ({', '.join(hooks)}); use int8-dynamic or int8, or executorch 1.5.x")

    class WeightOnlyLinearConfig(LinearConfig):
        def _weight_only(self, node: Any) -> bool:
            return (is_dequant(get_input_node(node, self.weight_idx))
                    and not is_dequant(get_input_node(node, self.act_idx)))

        def _get_act_deps(self, node: Any, ep: Any, precision: Any) -> Any:
            return (True, []) if self._weight_only(node) else super()._get_act_deps(node, ep, precision)

        def _get_output_deps(self, node: Any, ep: Any, precision: Any) -> Any:
            return super()._get_output_deps(node, ep, ConfigPrecisionType.FP32 if self._weight_only(node)
                                            else precision)

    configs = [WeightOnlyLinearConfig if c is LinearConfig else c for c in ALL_PARTITIONER_CONFIGS]
    return XnnpackPartitioner(configs=configs)


def quantize_weight_only(exported: Any, example_inputs: tuple, precision: str, keep: Any = None
                         ) -> tuple[Any, dict[str, Any]]:
    """PT2E weight-only quantization of the exported program's linears; returns the re-exported program and the
    manifest's quantization record."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    bits = BITS[precision]
    module = exported.module()
    n_split = split_linear_bias(module, quantized_linear(keep))
    prepared = prepare_pt2e(module, make_quantizer(weight_only_config(bits), keep))
    with torch.no_grad():   # no calibration: one pass sizes the per-channel weight observers
        prepared(*example_inputs)
    requantized = torch.export.export(convert_pt2e(prepared), example_inputs)
    quantized = {n.args[0].name: int(np.prod(n.meta["val"].shape)) for n in requantized.graph.nodes
                 if "dequantize_per_channel" in str(n.target) and "val" in n.meta}   # a shared weight counts once
    covered = sum(quantized.values()) / max(1, _weight_counts(exported))
    record = {"scheme": f"XNNPACK weight-only int{bits} of nn.Linear layers (per-channel symmetric weights, "
                        f"float32 activations and compute, f32-qc{bits}w kernels; convolutions fp32)",
              "layers_quantized": len(quantized),
              "biases_split": n_split, "weights_covered": round(covered, 4), "calibration_samples": 0}
    return requantized, record


def _weight_counts(exported: Any) -> int:
    """Parameters of the exported program held in tensors of rank >= 2 (weights; not biases, norms or buffers)."""
    params = set(exported.graph_signature.parameters)
    return sum(int(p.numel()) for k, p in exported.state_dict.items() if k in params and getattr(p, "ndim", 0) >= 2)
