"""OFA-KD projectors: map a student's intermediate feature into the teacher's logit space, one rule per family.

Hao et al., NeurIPS 2023, arXiv:2310.19444 (code Hao840/OFAKD distillers/ofa.py). Families cnn, vit, mixer, swin,
chosen from the student (its class and the shape of an exit's feature); a new family is one
`PROJECTORS.register(name, ProjectorRule(matches, build))`. Each family's layers and what goes beyond the reference:
docs/distill.md, "effai/train/projectors.py".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from effai.errors import UsageError
from effai.zoo.layers import SepConv   # re-exported: OFA-KD's and CDFKD-MFS's separable block
from effai.registry import Registry


@dataclass(frozen=True)
class ProjectorRule:
    """matches(student, feature) -> bool; build(student, feature, stage, d_s, d_t, num_classes) -> nn.Module."""

    matches: Callable[[nn.Module, Tensor], bool]
    build: Callable[[nn.Module, Tensor, int, int, int, int], nn.Module]
    layout: str                          # the feature layout the rule takes, for error messages


def cnn_projector(c_in: int, stage: int, d_star: int, num_classes: int) -> nn.Sequential:
    if stage < 4:
        blocks: list[nn.Module] = []
        c = c_in
        for i in range(4 - stage):
            out = d_star if i == 3 - stage else c * 2
            blocks.append(SepConv(c, out))
            c = out
    else:
        blocks = [nn.Conv2d(c_in, d_star, 1)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(d_star, num_classes))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated -> LayerNorm(4D) -> Linear(4D, out) -> act, on an NHWC grid."""

    def __init__(self, dim: int, out_dim: int, act: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = x[:, :h // 2 * 2, :w // 2 * 2]
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


class TokenProjector(nn.Module):
    """Patch tokens (after `prefix` class/register tokens) on a g x g grid -> merges -> blocks -> token -> logits."""

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int, stage: int, d_s: int, num_classes: int) -> None:
        from timm.models.vision_transformer import Block

        super().__init__()
        self.prefix, self.grid = prefix, grid
        n_merge = max(int(math.floor(math.log2(min(grid) / 7))), 0) if min(grid) >= 7 else 0
        merges, c = [], dim
        for i in range(n_merge):   # the reference: GELU after the first merge, then after all but the last
            merges.append(PatchMerging(c, d_s, act=i == 0 or i != n_merge - 1))
            c = d_s
        self.merges = nn.Sequential(*merges)
        self.prefix_proj = nn.Linear(dim, c) if (prefix and c != dim) else nn.Identity()
        heads = next(h for h in (4, 3, 2, 1) if c % h == 0)
        self.blocks = nn.Sequential(*[Block(dim=c, num_heads=heads) for _ in range(max(4 - stage, 1))])
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:                          # NHWC grid (swin)
            grid = x
        else:
            grid = x[:, self.prefix:].reshape(x.shape[0], self.grid[0], self.grid[1], x.shape[-1])
        tokens = self.merges(grid).flatten(1, 2)
        if self.prefix:
            tokens = torch.cat([self.prefix_proj(x[:, :self.prefix]), tokens], dim=1)
        tokens = self.blocks(tokens)
        feature = tokens[:, 0] if self.prefix else tokens.mean(1)
        return self.head(feature)


def _token_grid(student: nn.Module, n_patches: int) -> tuple[int, int]:
    grid = getattr(getattr(student, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == n_patches:
        return int(grid[0]), int(grid[1])
    g = int(round(math.sqrt(n_patches)))
    if g * g != n_patches:
        raise UsageError(f"{type(student).__name__}: {n_patches} patch tokens do not form a square grid; the token "
                         "projector needs the model's patch_embed.grid_size")
    return g, g


def _prefix(student: nn.Module) -> int:
    return int(getattr(student, "num_prefix_tokens", 0) or 0)


def _is_nhwc(student: nn.Module) -> bool:
    return getattr(student, "output_fmt", "NCHW") == "NHWC"


PROJECTORS: Registry[ProjectorRule] = Registry("OFA projector family")
PROJECTORS.register("vit", ProjectorRule(
    matches=lambda m, f: f.dim() == 3 and _prefix(m) > 0,
    build=lambda m, f, s, d_s, d_t, k: TokenProjector(f.shape[-1], _token_grid(m, f.shape[1] - _prefix(m)), _prefix(m),
                                                      s, d_s, k),
    layout="(B, prefix + N, D) tokens with a class token (timm VisionTransformer/DeiT)"))
PROJECTORS.register("mixer", ProjectorRule(
    matches=lambda m, f: f.dim() == 3 and _prefix(m) == 0,
    build=lambda m, f, s, d_s, d_t, k: TokenProjector(f.shape[-1], _token_grid(m, f.shape[1]), 0, s, d_s, k),
    layout="(B, N, D) tokens without a class token (MLP-Mixer, ResMLP, gMLP)"))
PROJECTORS.register("swin", ProjectorRule(
    matches=lambda m, f: f.dim() == 4 and _is_nhwc(m),
    build=lambda m, f, s, d_s, d_t, k: TokenProjector(f.shape[-1], (f.shape[1], f.shape[2]), 0, s, d_s, k),
    layout="(B, H, W, C) grids (timm Swin, output_fmt NHWC)"))
PROJECTORS.register("cnn", ProjectorRule(
    matches=lambda m, f: f.dim() == 4 and not _is_nhwc(m),
    build=lambda m, f, s, d_s, d_t, k: cnn_projector(f.shape[1], s, max(d_s, d_t), k),
    layout="(B, C, H, W) maps (CNNs: ResNet, GhostNetV3, MobileNet, ...)"))

FAMILY_ORDER = ("vit", "mixer", "swin", "cnn")


def family_of(student: nn.Module, feature: Tensor, path: str = "") -> str:
    """The first registered family whose rule takes this student's exit feature; UsageError when none does."""
    names = list(FAMILY_ORDER) + [n for n in PROJECTORS.names() if n not in FAMILY_ORDER]
    for name in names:
        if PROJECTORS.get(name).matches(student, feature):
            return name
    supported = "; ".join(f"{n}: {PROJECTORS.get(n).layout}" for n in names)
    raise UsageError(f"no OFA projector rule for {type(student).__name__} (exit '{path}' gives a {feature.dim()}-D "
                     f"feature {tuple(feature.shape)}); supported families: {supported}. Add one with "
                     "effai.train.projectors.PROJECTORS.register(name, ProjectorRule(matches, build, layout))")


def init_projector(module: nn.Module) -> None:
    """OFA-KD's init: truncated-normal(0.02) linears with zero bias, unit LayerNorms, Kaiming convs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
