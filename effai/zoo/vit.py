"""Small token models for small images: ViT (Dosovitskiy et al. 2021, arXiv:2010.11929) and MLP-Mixer (Tolstikhin
et al. 2021, arXiv:2105.01601) at the sizes CPU training on small data affords, built from timm's own classes (so
timm's feature_info, weight names and export behaviour hold): vit_pico, vit_tiny, vit_small, mixer_pico.
A pruned ViT rebuilds from `block_heads` / `block_mlp`. Sizes: docs/distill.md, "effai/zoo/vit.py".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from effai.errors import UsageError

VIT_SHAPES = {"vit_pico": (96, 6, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}
MIXER_SHAPES = {"mixer_pico": (96, 6)}


def vit(name: str, *, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, num_classes: int = 10,
        block_heads: Sequence[int] | None = None, block_mlp: Sequence[int] | None = None, **kw: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = VIT_SHAPES[name]
    _check_tokens(img_size, patch_size)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                              embed_dim=dim, depth=depth, num_heads=heads, **kw)
    if block_heads is not None or block_mlp is not None:
        shrink_blocks(model, block_heads, block_mlp)
    return model


MAX_TOKENS = 16384    # a 128 x 128 patch grid; a card asking for more is damaged or crafted


def _check_tokens(img_size: int, patch_size: int) -> None:
    """Card values are untrusted: bound the patch grid before the position embedding is allocated."""
    if patch_size < 1 or (img_size // patch_size) ** 2 > MAX_TOKENS:
        raise UsageError(f"input {img_size} px with patch {patch_size} makes {(img_size // max(1, patch_size)) ** 2} "
                         f"tokens, more than {MAX_TOKENS}; use a larger patch_size or a smaller input size")


def block_widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """(heads per block, MLP hidden neurons per block) of a timm ViT."""
    return ([int(b.attn.num_heads) for b in model.blocks], [int(b.mlp.fc1.out_features) for b in model.blocks])


def shrink_blocks(model: nn.Module, heads: Sequence[int] | None, hidden: Sequence[int] | None) -> None:
    """Resize a freshly built ViT to `heads[i]` heads and `hidden[i]` MLP neurons in block i (the first ones are
    kept; the checkpoint's weights are loaded afterwards). None keeps that dimension whole."""
    full_heads, full_hidden = block_widths(model)
    for name, counts, full in (("block_heads", heads, full_heads), ("block_mlp", hidden, full_hidden)):
        if counts is None:
            continue
        if len(counts) != len(full) or any(not isinstance(c, int) or not 1 <= c <= f for c, f in zip(counts, full)):
            raise UsageError(f"{name} {list(counts)[:16]} does not fit this ViT: it needs {len(full)} counts, block i "
                             f"between 1 and {full[0]}; the checkpoint's card is damaged or from another architecture")
    for i, block in enumerate(model.blocks):
        keep_heads_and_neurons(block, None if heads is None else range(heads[i]),
                               None if hidden is None else range(hidden[i]))


def keep_heads_and_neurons(block: nn.Module, heads: Sequence[int] | None, neurons: Sequence[int] | None) -> None:
    """Cut a timm ViT block down to the attention heads `heads` and the MLP hidden neurons `neurons` (indices, kept
    in the given order; None keeps all), carrying their weights over: q/k/v rows and proj columns of each kept
    head, fc1 rows and fc2 columns of each kept neuron. The block computes exactly what it computed with the other
    heads' and neurons' outputs set to zero."""
    attn, mlp = block.attn, block.mlp
    for what, idx, n in (("heads", heads, attn.num_heads), ("neurons", neurons, mlp.fc1.out_features)):
        if idx is not None and (not len(idx) or len(set(idx)) != len(idx) or not all(0 <= i < n for i in idx)):
            raise UsageError(f"keep {what} {list(idx)[:8]}: give distinct indices in 0..{n - 1}, at least one")
    if getattr(attn, "gate", None) is not None or not isinstance(attn.norm, nn.Identity) \
            or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise UsageError("pruning supports plain timm ViT blocks (no gated attention, no scale_attn_norm or "
                         "scale_mlp_norm); build the ViT without them")
    if heads is not None:
        idx = torch.as_tensor(list(heads), dtype=torch.long)
        hd, h, dim = attn.head_dim, attn.num_heads, attn.qkv.in_features
        qkv = _linear(dim, 3 * len(idx) * hd, attn.qkv)
        proj = _linear(len(idx) * hd, attn.proj.out_features, attn.proj)
        with torch.no_grad():
            qkv.weight.copy_(attn.qkv.weight.view(3, h, hd, dim)[:, idx].reshape(-1, dim))
            if attn.qkv.bias is not None:
                qkv.bias.copy_(attn.qkv.bias.view(3, h, hd)[:, idx].reshape(-1))
            proj.weight.copy_(attn.proj.weight.view(-1, h, hd)[:, idx].reshape(proj.out_features, -1))
            if attn.proj.bias is not None:
                proj.bias.copy_(attn.proj.bias)
        attn.qkv, attn.proj = qkv, proj
        attn.num_heads, attn.attn_dim = len(idx), len(idx) * hd
    if neurons is not None:
        idx = torch.as_tensor(list(neurons), dtype=torch.long)
        fc1 = _linear(mlp.fc1.in_features, len(idx), mlp.fc1)
        fc2 = _linear(len(idx), mlp.fc2.out_features, mlp.fc2)
        with torch.no_grad():
            fc1.weight.copy_(mlp.fc1.weight[idx])
            if mlp.fc1.bias is not None:
                fc1.bias.copy_(mlp.fc1.bias[idx])
            fc2.weight.copy_(mlp.fc2.weight[:, idx])
            if mlp.fc2.bias is not None:
                fc2.bias.copy_(mlp.fc2.bias)
        mlp.fc1, mlp.fc2 = fc1, fc2


def _linear(n_in: int, n_out: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype)


def mixer(name: str, *, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, num_classes: int = 10,
          **kw: Any) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    dim, depth = MIXER_SHAPES[name]
    _check_tokens(img_size, patch_size)
    return MlpMixer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    embed_dim=dim, num_blocks=depth, **kw)
