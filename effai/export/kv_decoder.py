"""A Hugging Face causal LM as an ExecuTorch decoder with a static KV cache: one method `forward(tokens (1, T),
input_pos (T,), [visual (1, Nv, D)]) -> logits (1, T, V)` with dynamic T (prefill T > 1, decode T = 1), lowered to
XNNPACK at fp32 / int8-weight / int4-weight. Built on transformers' `TorchExportableModuleWithStaticCache` (the
cache tensors are module buffers, mutated in place by the program). What worked with which versions: docs/stack.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from effai.errors import EffaiError, UsageError
from effai.export import executorch_weight_only as weight_only

PRECISIONS = ("fp32", "int8-weight", "int4-weight")


def static_cache_module(lm: Any, max_seq_len: int, set_visual: Any = None) -> Any:
    """The LM wrapped with a static KV cache of `max_seq_len` positions (batch 1); `set_visual(visual)` (ADEM-VL's
    `model.set_visual`) is called before each forward when given, so the fused layers read the visual features."""
    import torch
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    if not getattr(lm.config, "use_cache", True):
        lm.config.use_cache = True
    lm.generation_config = GenerationConfig(use_cache=True, cache_implementation="static",
                                            cache_config={"batch_size": 1, "max_cache_len": max_seq_len})

    class KVDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.core = TorchExportableModuleWithStaticCache(lm, 1, max_seq_len)

        def forward(self, tokens: Any, input_pos: Any, visual: Any = None) -> Any:
            if set_visual is not None and visual is not None:
                set_visual(visual)
            return self.core(input_ids=tokens, cache_position=input_pos)

    return KVDecoder().eval()


def export_decoder(module: Any, max_seq_len: int, visual_shape: tuple[int, ...] | None = None,
                   example_len: int = 4) -> Any:
    """torch.export of the static-cache module with a dynamic token count T in [1, max_seq_len - 1]. Strict
    (dynamo) tracing: non-strict export in torch 2.14.1 lifts the cache tensors as constants and lowering fails."""
    import torch

    if max_seq_len < 2 or example_len >= max_seq_len:
        raise UsageError(f"--max-seq-len {max_seq_len} must be >= {example_len + 1}")
    tokens = torch.zeros(1, example_len, dtype=torch.long)
    pos = torch.arange(example_len, dtype=torch.long)
    t = torch.export.Dim("T", min=1, max=max_seq_len - 1)
    args: tuple = (tokens, pos)
    dyn: dict[str, Any] = {"tokens": {1: t}, "input_pos": {0: t}}
    if visual_shape is not None:
        args = (*args, torch.zeros(*visual_shape))
        dyn["visual"] = None
    try:
        with torch.no_grad():
            return _sort_as_topk(torch.export.export(module, args, dynamic_shapes=dyn, strict=True)), args
    except Exception as e:  # noqa: BLE001 - the toolchain's many failure types become one line
        raise EffaiError(f"torch.export of the KV-cache decoder failed: {type(e).__name__}: {str(e)[:300]}") from e


def _sort_as_topk(exported: Any) -> Any:
    """aten.sort(x, dim, descending) = aten.topk(x, x.size(dim), dim, largest=descending, sorted=True) (the same
    values; ADEM-VL's adaptive-fusion threshold reads only the values): the ExecuTorch 1.5.1 runtime has no
    aten::sort.values kernel, and XNNPACK does not delegate sort, so a program with sort fails to load."""
    import torch

    aten = torch.ops.aten
    if not any(n.target == aten.sort.default for n in exported.graph.nodes):
        return exported

    def sort(x: Any, dim: int = -1, descending: bool = False) -> Any:
        return aten.topk.default(x, x.shape[dim], dim, descending, True)

    return exported.run_decompositions({aten.sort.default: sort})


def lower_decoder(exported: Any, example_inputs: tuple, precision: str, out_path: Path) -> dict[str, Any]:
    """XNNPACK lowering of the exported decoder at `precision`; writes the .pte, returns the manifest record
    (delegation, quantization, seconds). Weight-only: effai.export.executorch_weight_only's quantizer and partitioner
    (per-channel symmetric nn.Linear weights, float compute), re-exported with the same dynamic T."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from effai.export.targets.executorch import delegation_summary

    if precision not in PRECISIONS:
        raise UsageError(f"decoder precision {precision!r} is not offered; choose from: {', '.join(PRECISIONS)}")
    t0 = time.perf_counter()
    quant, partitioner = None, XnnpackPartitioner()
    if precision != "fp32":
        exported, quant = _weight_only(exported, example_inputs, precision)
        partitioner = weight_only.weight_only_partitioner()
    with torch.no_grad():   # the cache buffers are mutated in place; no tensor of a lowered program needs grad
        edge = to_edge_transform_and_lower(exported, partitioner=[partitioner])
    delegation = delegation_summary(edge.exported_program().graph_module)
    program = edge.to_executorch()
    from effai.files import atomic_write

    atomic_write(out_path, program.buffer)
    return {"precision": precision, "delegation": delegation, "quantization": quant,
            "bytes": out_path.stat().st_size, "lower_s": round(time.perf_counter() - t0, 2)}


def _weight_only(exported: Any, example_inputs: tuple, precision: str) -> tuple[Any, dict[str, Any]]:
    """effai's weight-only PT2E path (the same steps as executorch_weight_only.quantize_weight_only) with the
    re-export keeping the dynamic token count."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    bits = weight_only.BITS[precision]
    module = exported.module()
    n_split = weight_only.split_linear_bias(module, weight_only.quantized_linear())
    prepared = prepare_pt2e(module, weight_only.make_quantizer(weight_only.weight_only_config(bits)))
    with torch.no_grad():
        prepared(*example_inputs)
    converted = convert_pt2e(prepared)
    for p in converted.parameters():
        p.requires_grad_(False)
    t = torch.export.Dim("T", min=1, max=_max_t(exported))
    dyn: list[Any] = [{1: t}, {0: t}] + [None] * (len(example_inputs) - 2)
    with torch.no_grad():
        requantized = torch.export.export(converted, example_inputs, dynamic_shapes=tuple(dyn), strict=False)
    n_q = sum(1 for n in requantized.graph.nodes if "dequantize_per_channel" in str(n.target))
    return requantized, {"scheme": f"XNNPACK weight-only int{bits} of nn.Linear layers (per-channel symmetric, "
                                   "float32 activations; embedding and KV cache fp32)",
                         "layers_quantized": n_q, "biases_split": n_split}


def _max_t(exported: Any) -> int:
    for r in exported.range_constraints.values():
        if getattr(r, "upper", None) is not None and int(r.upper) < 1 << 20:
            return int(r.upper)
    raise EffaiError("the exported decoder has no bounded dynamic token dimension")
