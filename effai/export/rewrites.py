"""Export rewrites: swap an operator that some runtime lowers wrongly or slowly for an exact equivalent.

Each rewrite is registered under the module class name it applies to, with the targets that need it (None: all),
and runs after folding; fold() then checks the whole model's outputs, so a rewrite that is not exact fails the
export instead of shipping. A rewrite only goes where it helps: docs/architecture.md, "effai/export/rewrites.py".
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effai.registry import Registry
from effai.zoo.layers import NearestUpsample

# class name -> (description, rewrite(module, shapes) -> bool applied, targets it is for or None for all)
REWRITES: Registry[tuple[str, Callable[[nn.Module, dict], bool], tuple[str, ...] | None]] = Registry("export rewrite")


def apply_rewrites(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], target: str | None = None
                   ) -> dict[str, int]:
    """Apply the rewrites registered for `target` (None: every rewrite); {description: count}."""

    def wanted(m: nn.Module) -> bool:
        if type(m).__name__ not in REWRITES:
            return False
        for_targets = REWRITES.get(type(m).__name__)[2]
        return target is None or for_targets is None or target in for_targets

    def needed(m: nn.Module, shape: dict) -> bool:
        """TFLite lowers integer-scale nearest resizes correctly (and faster than two MatMuls): only fractional
        ones (e.g. 3x3 -> 7x7 at 224) are rewritten there."""
        if target != "tflite" or "gate" not in shape:
            return True
        (gh, gw), (oh, ow) = shape["gate"][-2:], shape["out"][-2:]
        return bool(oh % gh or ow % gw)

    targets = [(n, m) for n, m in model.named_modules() if wanted(m)]
    if not targets:
        return {}
    shapes: dict[str, dict] = {}
    handles = []

    def recorder(rec: dict, key: str) -> Callable:
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            rec.setdefault(key, tuple(out.shape))
        return hook

    for name, m in targets:
        rec = shapes.setdefault(name, {})
        handles.append(m.register_forward_hook(recorder(rec, "out")))
        gate = getattr(m, "gate_fn", None)
        if isinstance(gate, nn.Module):
            handles.append(gate.register_forward_hook(recorder(rec, "gate")))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    done: Counter[str] = Counter()
    for name, m in targets:
        desc, fn, _ = REWRITES.get(type(m).__name__)
        if shapes.get(name) and needed(m, shapes[name]) and fn(m, shapes[name]):
            done[f"{type(m).__name__}: {desc}"] += 1
    return dict(done)


def _ghost_dfc_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GhostModuleV2/V3 'attn' forward in deploy form, its DFC gate upsampled by NearestUpsample."""
    x1 = self.primary_conv(x)
    out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
    if out.shape[1] != self.out_chs:  # a full-range slice lowers to alias_copy, which XNNPACK does not delegate
        out = out[:, : self.out_chs, :, :]
    res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
    return out * self.dfc_upsample(self.gate_fn(res))


def _rewrite_ghost_dfc(m: nn.Module, shapes: dict) -> bool:
    if "gate" not in shapes:                         # mode without the DFC gate: nothing to rewrite
        return False
    if getattr(m, "infer_mode", True) is False:      # training form (--no-fold): keep the original forward
        return False
    if isinstance(getattr(m, "dfc_upsample", None), NearestUpsample):
        return False                                 # already rewritten (idempotent)
    m.dfc_upsample = NearestUpsample(shapes["gate"][-2:], shapes["out"][-2:])
    m.forward = types.MethodType(_ghost_dfc_forward, m)
    return True


_DFC = "DFC gate nearest upsample -> constant selection maps"
_DFC_TARGETS = ("executorch", "tflite", "coreml")
REWRITES.register("GhostModuleV2", (_DFC, _rewrite_ghost_dfc, _DFC_TARGETS))
REWRITES.register("GhostModuleV3", (_DFC, _rewrite_ghost_dfc, _DFC_TARGETS))
REWRITES.register("EffaiGhostModule", (_DFC, _rewrite_ghost_dfc, _DFC_TARGETS))


def _rewrite_fused_attention(m: nn.Module, shapes: dict) -> bool:
    """timm Attention through F.scaled_dot_product_attention lowers for ExecuTorch into a mask-handling decomposition
    (eq / any / where / logical_not / full_like / mul) that XNNPACK does not take; the explicit softmax(q k^T * scale) v
    path timm also has is the same function and runs its matmuls and softmax in the delegate (vit_tiny at 32x32:
    2.68 -> 2.29 ms, measured)."""
    if not type(m).__module__.startswith("timm.") or getattr(m, "fused_attn", None) is not True:
        return False                                 # timm's own classes only (a user's 'Attention' is left alone)
    m.fused_attn = False
    return True


REWRITES.register("Attention", ("fused SDPA -> explicit softmax attention", _rewrite_fused_attention,
                                ("executorch",)))
