"""GhostNetV3: a compact CNN whose ghost modules train with parallel branches and deploy as single convs.

Paper: Liu et al., "GhostNetV3: Exploring the Training Strategies for Compact Models", arXiv:2404.11202, 2024.
Folding (`fold()`, exact, idempotent): every branch's conv W and BN -> W' = W * gamma / sqrt(var + eps),
b' = beta - mu * gamma / sqrt(var + eps), summed into ONE biased conv. Parameter names mirror timm's
`GhostNet(version='v3')`. Spec and effai's implementation notes: docs/ghostnetv3.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EffaiGhostBottleneck", "EffaiGhostModule", "GhostNetV3", "SqueezeExcite", "ghostnetv3_050", "ghostnetv3_100",
    "ghostnetv3_130", "ghostnetv3_160", "make_divisible", "remap_timm_state_dict",
]

# Bottleneck table, grouped into stages exactly as timm groups it: the grouping fixes the state_dict names
# `blocks.<stage>.<index in stage>`, so it must not be flattened. Rows: (kernel, expansion, out, SE ratio, stride).
_STAGES: list[list[tuple[int, int, int, float, int]]] = [
    [(3, 16, 16, 0.0, 1)],
    [(3, 48, 24, 0.0, 2)],
    [(3, 72, 24, 0.0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(5, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0.0, 2)],
    [(3, 200, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 480, 112, 0.25, 1),
     (3, 672, 112, 0.25, 1)],
    [(5, 672, 160, 0.25, 2)],
    [(5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1)],
]
_DFC_FROM_BLOCK = 2      # blocks with index >= 2 gate ghost1 with DFC attention (14 of the 16 blocks)
_HEAD_HIDDEN = 1280      # width of the 1x1 conv after pooling; not scaled by `width` (as in the paper and timm)


def make_divisible(v: float, divisor: int = 4, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Nearest multiple of `divisor` (at least `min_value`, default `divisor`), bumped up one step when rounding
    down would lose more than 10% (round_limit 0.9): the usual MobileNet channel rule, as timm applies it."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ConvBn(nn.Module):
    """conv (no bias) -> BN [-> act]. Attribute names `conv`, `bn1` match timm's ConvBnAct."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn1(self.conv(x)))


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(expand(ReLU(reduce(mean_hw x)))), reduced to make_divisible(C * ratio, 4) channels.
    Names (`conv_reduce`, `act1`, `conv_expand`, `gate`) match timm's SqueezeExcite."""

    def __init__(self, chs: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        rd = make_divisible(chs * se_ratio, 4)
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)
        self.gate = nn.Hardsigmoid()   # relu6(x + 3) / 6, the paper's hard-sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU for the fold's arithmetic; a meta tensor stays meta (shapes only: `effai zoo list` counts
    the deploy form without data)."""
    t = t.detach().double()
    return t if t.is_meta else t.cpu()


def _merge_branches(branches: Iterable[nn.Module], kernel_size: int, template: nn.Conv2d) -> nn.Conv2d:
    """Sum of BN-folded branches (ConvBn, or a bare BatchNorm2d = identity-BN) as one biased conv shaped like
    `template` with a kxk kernel. Computed in float64 on the CPU, then cast back, so the fold adds no rounding of
    its own beyond the final cast."""
    w_sum: torch.Tensor | None = None
    b_sum: torch.Tensor | None = None
    out_chs, in_per_group = template.out_channels, template.in_channels // template.groups
    for br in branches:
        if isinstance(br, ConvBn):
            w, bn = _f64(br.conv.weight), br.bn1
        elif isinstance(br, nn.BatchNorm2d):       # identity-BN: 1x1 one-hot per channel, centred once padded
            if out_chs != template.in_channels:
                raise ValueError("identity-BN branch needs out_channels == in_channels")
            w, bn = torch.zeros(out_chs, in_per_group, 1, 1, dtype=torch.float64), br
            w[torch.arange(out_chs), torch.arange(out_chs) % in_per_group, 0, 0] = 1.0
        else:
            raise TypeError(f"cannot fold branch {type(br).__name__}")
        pad = (kernel_size - w.shape[-1]) // 2     # 1x1 -> kxk: zeros around the centre
        w = F.pad(w, [pad, pad, pad, pad])
        mean, var = _f64(bn.running_mean), _f64(bn.running_var)
        gamma = _f64(bn.weight) if bn.weight is not None else torch.ones_like(var)
        beta = _f64(bn.bias) if bn.bias is not None else torch.zeros_like(mean)
        t = gamma / torch.sqrt(var + bn.eps)
        w, b = w * t.reshape(-1, 1, 1, 1), beta - mean * t
        w_sum = w if w_sum is None else w_sum + w
        b_sum = b if b_sum is None else b_sum + b
    if w_sum is None or b_sum is None:
        raise ValueError("nothing to fold")
    ref = template.weight
    conv = nn.Conv2d(template.in_channels, out_chs, kernel_size, template.stride, kernel_size // 2,
                     groups=template.groups, bias=True, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        conv.weight.copy_(w_sum.to(ref.dtype))
        conv.bias.copy_(b_sum.to(ref.dtype))
    return conv


def _drop(module: nn.Module, *names: str) -> None:
    for n in names:
        if hasattr(module, n):
            delattr(module, n)


class EffaiGhostModule(nn.Module):
    """Ghost module (ratio 2) with GhostNetV3's re-parameterizable branches and an optional DFC gate.

    Training form: `primary_rpr_conv` (n x ConvBn 1x1), `primary_activation`, `cheap_rpr_conv` (n x ConvBn dw3x3),
    `cheap_rpr_scale` (ConvBn dw1x1 or None), `cheap_rpr_skip` (BatchNorm2d or None), `cheap_activation`.
    Folded / deploy form: `primary_conv` = Sequential(1x1 conv with bias, act), `cheap_operation` =
    Sequential(dw3x3 conv with bias, act), `infer_mode` = True. With the DFC gate (timm's mode 'shortcut'):
    `short_conv` and `gate_fn`, kept as they are by `fold()`; effai's export rewrite (effai.export.rewrites,
    registered under this class name) swaps the nearest upsample for constant selection maps.
    """

    def __init__(self, in_chs: int, out_chs: int, *, act: bool = True, use_dfc: bool = False, num_branches: int = 3,
                 scale_branch: bool = True, identity_bn: bool = True, deploy: bool = False, ratio: int = 2,
                 dw_size: int = 3) -> None:
        super().__init__()
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        if identity_bn and new_chs != init_chs:
            raise ValueError("the identity-BN branch needs ratio 2 (cheap op maps init_chs -> init_chs)")
        self.in_chs, self.out_chs, self.init_chs, self.new_chs = in_chs, out_chs, init_chs, new_chs
        self.dw_size = dw_size
        self.num_branches, self.scale_branch, self.identity_bn = num_branches, scale_branch, identity_bn
        self.mode = "shortcut" if use_dfc else "original"   # timm's names for "with / without the DFC gate"
        self.infer_mode = deploy
        act_layer = nn.ReLU if act else nn.Identity   # ghost2 has no activation (linear bottleneck)
        if deploy:
            self.primary_conv = nn.Sequential(nn.Conv2d(in_chs, init_chs, 1, 1, 0, bias=True), act_layer())
            self.cheap_operation = nn.Sequential(
                nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=True), act_layer())
        else:
            # Empty slots first, so the folded modules take the deploy form's place (same state_dict key order).
            self.add_module("primary_conv", None)
            self.add_module("cheap_operation", None)
            self.primary_rpr_conv = nn.ModuleList(ConvBn(in_chs, init_chs, 1) for _ in range(num_branches))
            self.primary_activation = act_layer()
            self.cheap_rpr_skip = nn.BatchNorm2d(init_chs) if identity_bn else None
            self.cheap_rpr_conv = nn.ModuleList(
                ConvBn(init_chs, new_chs, dw_size, groups=init_chs) for _ in range(num_branches))
            self.cheap_rpr_scale = ConvBn(init_chs, new_chs, 1, groups=init_chs) if scale_branch else None
            self.cheap_activation = act_layer()
        if use_dfc:
            self.gate_fn: nn.Module | None = nn.Sigmoid()
            self.short_conv: nn.Module | None = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
                nn.Conv2d(out_chs, out_chs, (1, 5), 1, (0, 2), groups=out_chs, bias=False),
                nn.BatchNorm2d(out_chs),
                nn.Conv2d(out_chs, out_chs, (5, 1), 1, (2, 0), groups=out_chs, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        else:
            self.gate_fn = None
            self.short_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.infer_mode:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
        else:
            x1 = self.primary_activation(sum(br(x) for br in self.primary_rpr_conv))
            x2 = sum(br(x1) for br in self.cheap_rpr_conv)
            if self.cheap_rpr_scale is not None:
                x2 = x2 + self.cheap_rpr_scale(x1)
            if self.cheap_rpr_skip is not None:
                x2 = x2 + self.cheap_rpr_skip(x1)
            x2 = self.cheap_activation(x2)
        out = torch.cat([x1, x2], dim=1)
        if out.shape[1] != self.out_chs:   # odd out_chs only; a full-range slice would export as a needless copy
            out = out[:, : self.out_chs]
        if self.short_conv is None:
            return out
        gate = self.gate_fn(self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2)))
        return out * F.interpolate(gate, size=out.shape[-2:], mode="nearest")

    @torch.no_grad()
    def fold(self) -> EffaiGhostModule:
        """Merge the branches into `primary_conv` / `cheap_operation` (exact, idempotent). Returns self."""
        if self.infer_mode:
            return self
        primary = _merge_branches(self.primary_rpr_conv, 1, self.primary_rpr_conv[0].conv)
        cheap_branches = [*self.cheap_rpr_conv, self.cheap_rpr_scale, self.cheap_rpr_skip]
        cheap = _merge_branches([b for b in cheap_branches if b is not None], self.dw_size,
                                self.cheap_rpr_conv[0].conv)
        self.primary_conv = nn.Sequential(primary, self.primary_activation).train(self.training)
        self.cheap_operation = nn.Sequential(cheap, self.cheap_activation).train(self.training)
        _drop(self, "primary_rpr_conv", "primary_activation", "cheap_rpr_conv", "cheap_rpr_scale", "cheap_rpr_skip",
              "cheap_activation")
        self.infer_mode = True
        return self


class EffaiGhostBottleneck(nn.Module):
    """GhostNetV3 bottleneck: ghost1 -> [re-parameterizable dw kxk s2] -> [SE] -> ghost2, + shortcut.

    Stride-2 training form: `dw_rpr_conv` (n x ConvBn dw kxk s2), `dw_rpr_scale` (ConvBn dw1x1 s2 or None);
    folded / deploy form: `conv_dw` (one biased dw conv). `fold()` folds the dw conv and both ghost modules.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, *, use_dfc: bool = False, num_branches: int = 3, scale_branch: bool = True,
                 identity_bn: bool = True, deploy: bool = False) -> None:
        super().__init__()
        branch_kw: dict[str, Any] = dict(num_branches=num_branches, scale_branch=scale_branch,
                                         identity_bn=identity_bn, deploy=deploy)
        self.stride, self.dw_kernel_size = stride, dw_kernel_size
        self.infer_mode = deploy
        k = dw_kernel_size
        if stride > 1:   # the folded dw conv (an empty slot until fold) comes first: state_dict keys in timm's order
            conv_dw = nn.Conv2d(mid_chs, mid_chs, k, stride, k // 2, groups=mid_chs, bias=True) if deploy else None
            self.add_module("conv_dw", conv_dw)
        self.ghost1 = EffaiGhostModule(in_chs, mid_chs, act=True, use_dfc=use_dfc, **branch_kw)
        if stride > 1 and not deploy:
            self.dw_rpr_conv = nn.ModuleList(
                ConvBn(mid_chs, mid_chs, k, stride, groups=mid_chs) for _ in range(num_branches))
            self.dw_rpr_scale = ConvBn(mid_chs, mid_chs, 1, stride, groups=mid_chs) if scale_branch else None
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else nn.Identity()
        self.ghost2 = EffaiGhostModule(mid_chs, out_chs, act=False, use_dfc=False, **branch_kw)
        if in_chs == out_chs and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, k, stride, k // 2, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.stride > 1:
            if self.conv_dw is not None:
                y = self.conv_dw(y)
            else:
                z = sum(br(y) for br in self.dw_rpr_conv)
                y = z + self.dw_rpr_scale(y) if self.dw_rpr_scale is not None else z
        y = self.se(y)
        y = self.ghost2(y)
        return y + self.shortcut(x)

    @torch.no_grad()
    def fold(self) -> EffaiGhostBottleneck:
        """Fold the stride-2 dw branches into `conv_dw` and both ghost modules (exact, idempotent). Returns self."""
        self.ghost1.fold()
        self.ghost2.fold()
        if self.stride > 1 and self.conv_dw is None:
            branches = [*self.dw_rpr_conv, self.dw_rpr_scale]
            self.conv_dw = _merge_branches([b for b in branches if b is not None], self.dw_kernel_size,
                                           self.dw_rpr_conv[0].conv).train(self.training)
            _drop(self, "dw_rpr_conv", "dw_rpr_scale")
        self.infer_mode = True
        return self


class GhostNetV3(nn.Module):
    """GhostNetV3 (Liu et al. 2024, arXiv:2404.11202) at width `width`; see the module docstring for the formulas.

    Args:
        width: channel multiplier (0.5 / 1.0 / 1.3 / 1.6 in the paper); channels = make_divisible(c * width, 4).
        num_classes: classifier outputs; 0 drops the classifier (forward returns the 1280-d pre-logits).
        in_chans: input channels of the stem.
        num_branches: parallel conv+BN branches per re-parameterizable conv (3 in the paper; 1 = plain GhostNet
            convs plus the optional branches below).
        scale_branch: add the dw1x1+BN "scale" branch to the cheap op and the stride-2 dw conv (paper: on).
        identity_bn: add the identity-BN branch to the cheap op (paper: on).
        deploy: build the folded form directly (single biased convs); its state_dict equals a folded model's.
        drop_rate: dropout before the classifier (0.2, the reference code's and timm's default).

    With the defaults, `GhostNetV3(width=w).load_state_dict(timm.create_model('ghostnetv3_0xx').state_dict())`
    works strictly (names mirror timm); after `fold()` it matches timm's `convert_to_deploy()` state_dict.
    """

    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_chans: int = 3, num_branches: int = 3,
                 scale_branch: bool = True, identity_bn: bool = True, deploy: bool = False,
                 drop_rate: float = 0.2) -> None:
        super().__init__()
        self.width, self.num_classes, self.in_chans, self.drop_rate = width, num_classes, in_chans, drop_rate
        self.num_branches, self.scale_branch, self.identity_bn = num_branches, scale_branch, identity_bn
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU()
        prev, index, stages, reduction = stem_chs, 0, [], 2
        self.feature_info: list[dict[str, Any]] = []   # timm's convention: one entry per stage output
        for stage in _STAGES:
            layers = []
            reduction *= stage[0][4]
            for k, exp, c, se, s in stage:
                out_chs, mid_chs = make_divisible(c * width, 4), make_divisible(exp * width, 4)
                layers.append(EffaiGhostBottleneck(
                    prev, mid_chs, out_chs, k, s, se, use_dfc=index >= _DFC_FROM_BLOCK, num_branches=num_branches,
                    scale_branch=scale_branch, identity_bn=identity_bn, deploy=deploy))
                prev, index = out_chs, index + 1
            stages.append(nn.Sequential(*layers))
            self.feature_info.append({"module": f"blocks.{len(stages) - 1}", "num_chs": prev, "reduction": reduction})
        head_chs = make_divisible(960 * width, 4)   # the last stage's expansion (960), as in the paper
        stages.append(nn.Sequential(ConvBn(prev, head_chs, 1, act=True)))
        self.feature_info.append({"module": f"blocks.{len(stages) - 1}", "num_chs": head_chs, "reduction": reduction})
        self.blocks = nn.Sequential(*stages)
        self.num_features, self.head_hidden_size = head_chs, _HEAD_HIDDEN
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(head_chs, _HEAD_HIDDEN, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU()
        self.flatten = nn.Flatten(1)
        self.classifier: nn.Module = nn.Linear(_HEAD_HIDDEN, num_classes) if num_classes > 0 else nn.Identity()
        # Initialization: PyTorch defaults, as in the reference code and timm (no custom init).

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.act2(self.conv_head(self.global_pool(x))))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def infer_mode(self) -> bool:
        """True when every re-parameterizable block is in its folded (deploy) form."""
        return all(m.infer_mode for m in self.modules() if isinstance(m, (EffaiGhostBottleneck, EffaiGhostModule)))

    @torch.no_grad()
    def fold(self) -> GhostNetV3:
        """Fold every bottleneck (its stride-2 dw conv and both ghost modules) in place; exact and idempotent.
        The stem, shortcut, DFC and head BNs stay (effai.export.fold fuses those generically). Returns self."""
        for m in [m for m in self.modules() if isinstance(m, (EffaiGhostBottleneck, EffaiGhostModule))]:
            m.fold()
        return self


def ghostnetv3_050(**kw: Any) -> GhostNetV3:
    """GhostNetV3 0.5x."""
    return GhostNetV3(width=0.5, **kw)


def ghostnetv3_100(**kw: Any) -> GhostNetV3:
    """GhostNetV3 1.0x."""
    return GhostNetV3(width=1.0, **kw)


def ghostnetv3_130(**kw: Any) -> GhostNetV3:
    """GhostNetV3 1.3x (79.1% ImageNet top-1 in the paper)."""
    return GhostNetV3(width=1.3, **kw)


def ghostnetv3_160(**kw: Any) -> GhostNetV3:
    """GhostNetV3 1.6x."""
    return GhostNetV3(width=1.6, **kw)


_UPSTREAM_BN = re.compile(r"(_rpr_(?:conv\.\d+|scale))\.bn\.")


def remap_timm_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Map a timm / reference GhostNetV3 state_dict to effai's names.

    effai mirrors timm's names, so for `timm.create_model('ghostnetv3_*').state_dict()` (training form, or after
    timm's `convert_to_deploy()`, which matches effai's `fold()` / `deploy=True` form) this is the identity.
    It also accepts the checkpoint layout of the reference code (huawei-noah/Efficient-AI-Backbones), doing what
    timm's checkpoint filter does: unwraps {'state_dict': ...} / {'model': ...}, strips a DistributedDataParallel
    'module.' prefix, drops thop's 'total_ops' / 'total_params' counters and renames the branch BN '.bn.' -> '.bn1.'.
    """
    for key in ("state_dict", "model"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if k.endswith(("total_ops", "total_params")):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        out[_UPSTREAM_BN.sub(r"\1.bn1.", k)] = v
    return out
