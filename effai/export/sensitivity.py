"""Per-layer quantization sensitivity, and the float-layer fallback plan built from it.

One layer at a time (Wu et al., "Integer Quantization for Deep Learning Inference", 2020, sec. 5):
s_l = || f(x) - f_l(x) ||^2 / || f(x) ||^2, f_l = the model with layer l alone fake-quantized at the target precision.
The fallback keeps the top-k layers in float, k = 1, 2, 4, ... (at most half), until the accuracy gate passes.
Detail: docs/quantization.md, "effai/export/sensitivity.py".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from effai.export.targets.base import ALL_LAYERS, LayerRule

WEIGHT_BITS = {"int8": 8, "int8-dynamic": 8, "int8-weight": 8, "int4-weight": 4, "palette4": 4, "palette6": 6,
               "palette8": 8, "fp16": 11}
QUANTIZED_INPUTS = {"int8"}


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization: s_c = max|w_c| / (2^(b-1) - 1), w ~ s_c round(w / s_c)."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def fake_quant_act(x: torch.Tensor, lo: float, hi: float, bits: int = 8) -> torch.Tensor:
    """Asymmetric per-tensor fake quantization with range [lo, hi] (0 always representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2 ** bits - 1
    scale = max(hi - lo, 1e-12) / levels
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def layer_kind(m: nn.Module) -> str:
    """'linear', 'depthwise' (one group per input channel: TFLite's DEPTHWISE_CONV_2D) or 'conv'."""
    if isinstance(m, nn.Linear):
        return "linear"
    return "depthwise" if m.groups > 1 and m.groups == m.in_channels else "conv"


def quantizable_layers(model: nn.Module, rule: LayerRule = ALL_LAYERS) -> list[str]:
    """Conv2d/Linear module names the backend quantizes under `rule` (the target's LayerRule for the precision)."""
    return [n for n, m in model.named_modules()
            if n and isinstance(m, (nn.Conv2d, nn.Linear)) and rule.covers(layer_kind(m), m.weight.numel())]


def layer_sensitivity(model: nn.Module, x: np.ndarray, precision: str, rule: LayerRule = ALL_LAYERS,
                      max_samples: int = 32, batch: int = 16) -> list[tuple[str, float]]:
    """[(layer name, s_l)] sorted most sensitive first, on up to max_samples calibration inputs, over the layers
    the target quantizes at this precision (`rule`)."""
    bits = WEIGHT_BITS.get(precision, 8)
    quant_inputs = precision in QUANTIZED_INPUTS
    xs = [torch.from_numpy(np.ascontiguousarray(x[i:i + batch])) for i in range(0, min(len(x), max_samples), batch)]
    model = model.eval()
    names = quantizable_layers(model, rule)
    modules = dict(model.named_modules())
    ranges: dict[str, list[float]] = {n: [float("inf"), float("-inf")] for n in names}

    def observe(name: str):
        def fn(_m: Any, inputs: Any) -> None:
            t = inputs[0]
            ranges[name][0] = min(ranges[name][0], float(t.min()))
            ranges[name][1] = max(ranges[name][1], float(t.max()))
        return fn

    handles = [modules[n].register_forward_pre_hook(observe(n)) for n in names]
    with torch.no_grad():
        try:
            ref = [_first(model(b)) for b in xs]
        finally:
            for h in handles:
                h.remove()
    denom = sum(float((r.double() ** 2).sum()) for r in ref) or 1.0
    scores = []
    for n in names:
        m = modules[n]
        original = m.weight.data
        m.weight.data = fake_quant_weight(original, bits)
        lo, hi = ranges[n]
        handle = m.register_forward_pre_hook(lambda _m, inp, lo=lo, hi=hi: (fake_quant_act(inp[0], lo, hi),)
                                             + tuple(inp[1:])) if quant_inputs else None
        try:
            with torch.no_grad():
                err = sum(float(((_first(model(b)) - r).double() ** 2).sum()) for b, r in zip(xs, ref))
        finally:
            m.weight.data = original
            if handle is not None:
                handle.remove()
        scores.append((n, err / denom))
    return sorted(scores, key=lambda t: -t[1])


def fallback_schedule(n_layers: int) -> list[int]:
    """k = 1, 2, 4, ... float layers, at most half of the quantizable layers."""
    ks, k = [], 1
    while k <= max(1, n_layers // 2):
        ks.append(k)
        k *= 2
    return ks


def _first(out: Any) -> torch.Tensor:
    from effai.export.fold import flat_outputs

    return flat_outputs(out)[0]
