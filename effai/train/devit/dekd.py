"""DEKD, DeViT's decomposition-and-ensemble distillation loss (Xu et al., arXiv:2309.05015; falcon-xu/DeViT):
    L   = (1 - a) CE(z_s, y) + a CE(z_s, argmax z_t) + sum_{X in Q,K,V} g_X R_X        a = 0.5, g = (0.2, 0.1, 0.3)
    R_X = sum_n KL( softmax(X_t X_t^T / sqrt(d_t))_n || softmax(X_s X_s^T / sqrt(d_s))_n ) / (B * L_s)
X: the Q, K or V token features of block L // 2 - 1 of sub-teacher and student. Heads, d, the modes ("reference",
effai's earlier "token_mean"): docs/distill.md, "effai/train/devit/dekd.py".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from effai.errors import UsageError

QKV = ("q", "k", "v")
RELATION_MODES = ("reference", "token_mean")


def middle_index(depth: int) -> int:
    """The reference's block: depth // 2 - 1, 0-based (ViT-L: 11 of 24, ViT-Ti: 5 of 12, vit_pico: 2 of 6)."""
    return max(depth // 2 - 1, 0)


def middle_block(model: nn.Module) -> int:
    """Index of the block whose Q/K/V DEKD compares: `middle_index(depth)`; UsageError for a model without one."""
    blocks = getattr(model, "blocks", None)
    if not blocks or not hasattr(getattr(blocks[middle_index(len(blocks))], "attn", None), "qkv"):
        raise UsageError(f"{type(model).__name__} is not a ViT with fused q/k/v attention (blocks.<i>.attn.qkv); "
                         "DeViT's teacher and sub-models must be timm ViTs (e.g. vit_pico, vit_tiny, vit_small)")
    return middle_index(len(blocks))


def depth(model: nn.Module) -> int:
    """The number of transformer blocks (L_s, by which the reference divides each relation term)."""
    return len(model.blocks)


def qkv_path(model: nn.Module, block: int | None = None) -> str:
    """Module path of the middle block's fused qkv projection (its output holds Q, K and V)."""
    b = middle_block(model) if block is None else block
    return f"blocks.{b}.attn.qkv"


def num_heads(model: nn.Module, block: int | None = None) -> int:
    b = middle_block(model) if block is None else block
    return int(model.blocks[b].attn.num_heads)


def split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """timm Attention's qkv output (B, N, 3 * C) -> Q, K, V each (B, N, C) with the heads concatenated."""
    if qkv.shape[-1] % 3:
        raise ValueError(f"qkv output width {qkv.shape[-1]} is not a multiple of 3")
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def relation_logits(x: Tensor, head_dim: int) -> Tensor:
    """X X^T / sqrt(d): the (B, N, N) token relation before the row softmax."""
    return x @ x.transpose(-1, -2) / math.sqrt(head_dim)


def check_mode(mode: str) -> str:
    if mode not in RELATION_MODES:
        raise UsageError(f"DEKD relation mode '{mode}' is not one of: {', '.join(RELATION_MODES)} (reference: the "
                         "KL summed over relation rows / batch / student depth; token_mean: averaged over the rows)")
    return mode


def relation_kl(x_t: Tensor, x_s: Tensor, head_dim_t: int, head_dim_s: int, mode: str = "token_mean") -> Tensor:
    """KL(softmax(rel_t) || softmax(rel_s)) of each relation row, summed over the rows and averaged over the batch
    (mode "reference", KLDivLoss "batchmean"), or averaged over rows and batch (mode "token_mean")."""
    check_mode(mode)
    if x_t.shape[:2] != x_s.shape[:2]:
        raise UsageError(f"DEKD compares token relations, but the teacher has {x_t.shape[1]} tokens and the student "
                         f"{x_s.shape[1]}; give both the same input size and patch size")
    log_t = F.log_softmax(relation_logits(x_t.float(), head_dim_t), dim=-1)
    log_s = F.log_softmax(relation_logits(x_s.float(), head_dim_s), dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / x_t.shape[0]
    return kl if mode == "reference" else kl / x_t.shape[1]


def qkv_relation_terms(qkv_t: Tensor, qkv_s: Tensor, heads_t: int, heads_s: int, *, mode: str = "token_mean",
                       student_depth: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(R_Q, R_K, R_V) from the teacher's and student's qkv outputs. Mode "reference" (DeViT's training recipe):
    pass `student_depth=depth(student)`, each term is divided by it as in the reference; "token_mean" ignores it."""
    xt, xs = split_qkv(qkv_t), split_qkv(qkv_s)
    hd_t, hd_s = xt[0].shape[-1] // heads_t, xs[0].shape[-1] // heads_s
    scale = 1.0 / student_depth if check_mode(mode) == "reference" else 1.0
    return tuple(scale * relation_kl(a, b, hd_t, hd_s, mode) for a, b in zip(xt, xs))  # type: ignore[return-value]


def dekd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, relations: Sequence[Tensor], *, alpha: float = 0.5,
              gammas: Sequence[float] = (0.2, 0.1, 0.3), label_smoothing: float = 0.0,
              target: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The DEKD total and its terms (for logging). `relations` = (R_Q, R_K, R_V) from `qkv_relation_terms`;
    `target`: soft labels of a mixed batch (mixup/cutmix, smoothing included), used by the CE term instead of y."""
    if target is not None:
        from effai.train.mixing import soft_cross_entropy

        ce = soft_cross_entropy(z_s, target)
    else:
        ce = F.cross_entropy(z_s, y, label_smoothing=label_smoothing)
    hard = F.cross_entropy(z_s, z_t.argmax(dim=1))
    rel = sum(g * r for g, r in zip(gammas, relations))
    total = (1 - alpha) * ce + alpha * hard + rel
    terms = {"ce": ce.item(), "hard_kd": hard.item(), **{f"r_{n}": r.item() for n, r in zip(QKV, relations)}}
    return total, terms
