"""DeViT's optional stage 2: structured pruning of a sub-model's MLP neurons and attention heads (Xu et al.,
arXiv:2309.05015; falcon-xu/DeViT core/imp_rank.py), ranked by
    score(u) = 0.1 * HSIC(act_u, softmax(z)) + 0.9 * sum |act_u|         (each term min-max normalized per layer)
The lowest-scoring units are removed for real (effai/zoo/vit.py `keep_heads_and_neurons`), then DEKD recovers.
Activations, HSIC, choices against the reference: docs/distill.md, "effai/train/devit/prune.py".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effai.errors import UsageError
from effai.zoo.vit import block_widths, keep_heads_and_neurons

SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
HSIC_WEIGHT, ACT_WEIGHT = 0.1, 0.9


def center(k: Tensor) -> Tensor:
    """H K H for a batch of (..., B, B) kernels: subtract row and column means, add back the overall mean."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-1, -2), keepdim=True)


def hsic(x: Tensor, y: Tensor) -> Tensor:
    """HSIC of each unit's activations with the prediction: x (U, B, D) units' per-sample vectors (standardized
    here over B), y (B, K) softmax predictions -> (U,) scores. Multi-scale Gaussian kernel on x, linear on y."""
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-12)
    d2 = torch.cdist(x, x).square()
    kx = sum(torch.exp(-d2 / (2 * s * s)) for s in SIGMAS) / len(SIGMAS)
    y = y - y.mean(0, keepdim=True)
    ky = center(y @ y.T)
    return (center(kx) * ky).sum((-1, -2))      # trace(A B) of symmetric A, B


def minmax(v: Tensor) -> Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


def unit_scores(acts: Tensor, probs: Tensor) -> Tensor:
    """0.1 * HSIC + 0.9 * sum|act| (each min-max normalized over the layer's units) for acts (B, N, U, C): U units,
    each with C channels per token (C = 1 for neurons, head_dim for heads)."""
    per_sample = acts.mean(-1).permute(2, 0, 1)                  # (U, B, N): each sample's token vector per unit
    relevance = hsic(per_sample.float(), probs.float())
    magnitude = acts.abs().sum((0, 1, 3)).float()
    return HSIC_WEIGHT * minmax(relevance) + ACT_WEIGHT * minmax(magnitude)


@torch.no_grad()
def rank_units(model: nn.Module, batches: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per block, the (head scores, neuron scores) summed over `batches` (normalized inputs of the model, >= 2 images
    each). Two passes per batch: the first gives the prediction, the second scores each block's units in a hook as the
    block runs, so only one block's activations are alive at a time."""
    heads, _ = block_widths(model)
    head_scores: list[Any] = [0.0] * len(heads)
    neuron_scores: list[Any] = [0.0] * len(heads)

    def scorer(scores: list[Any], i: int, units: int | None, probs: Tensor) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            a = args[0]                                                # (B, N, units * C)
            acts = a.unflatten(-1, (units, -1)) if units else a.unsqueeze(-1)
            scores[i] = scores[i] + unit_scores(acts, probs).cpu()
        return hook

    was_training = model.training
    model.eval()
    try:
        for x in batches:
            if x.shape[0] < 2:
                raise UsageError("ranking needs batches of >= 2 images (HSIC compares images with each other)")
            probs = F.softmax(model(x), dim=-1)
            handles = []
            for i, block in enumerate(model.blocks):
                handles.append(block.attn.proj.register_forward_pre_hook(scorer(head_scores, i, heads[i], probs)))
                handles.append(block.mlp.fc2.register_forward_pre_hook(scorer(neuron_scores, i, None, probs)))
            try:
                model(x)
            finally:
                for h in handles:
                    h.remove()
    finally:
        model.train(was_training)
    return head_scores, neuron_scores


def keep_count(units: int, ratio: float) -> int:
    """Units kept when `ratio` of `units` is pruned: the removed count is ratio * units rounded half up
    (3 heads at 0.34 or 0.5: 1 and 2 removed), and at least one unit stays."""
    return max(1, units - math.floor(ratio * units + 0.5))


def keep_top(scores: Tensor, ratio: float) -> list[int]:
    """Indices of the highest-scoring units, in their original order."""
    k = keep_count(scores.numel(), ratio)
    return sorted(torch.topk(scores, k).indices.tolist())


@dataclass(frozen=True)
class PruneResult:
    heads: list[int]                 # heads per block, after
    hidden: list[int]                # MLP neurons per block, after
    heads_before: list[int]
    hidden_before: list[int]
    params_before: int
    params_after: int

    def arch_kwargs(self) -> dict[str, list[int]]:
        """The card options that rebuild the pruned model (effai/zoo/vit.py)."""
        return {"block_heads": self.heads, "block_mlp": self.hidden}

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "mlp_neurons": self.hidden, "heads_before": self.heads_before,
                "mlp_neurons_before": self.hidden_before, "params_before": self.params_before,
                "params_after": self.params_after}


def check_ratios(neurons: float, heads: float) -> None:
    for name, r in (("prune_neurons", neurons), ("prune_heads", heads)):
        if not 0.0 <= r < 1.0:
            raise UsageError(f"{name} {r} must lie in [0, 1): the fraction of each block's units to remove, "
                             f"e.g. --set {name}=0.5")


def prune_vit(model: nn.Module, batches: list[Tensor], *, neurons: float, heads: float) -> PruneResult:
    """Rank every block's heads and MLP neurons on `batches` and remove the lowest `heads` / `neurons` fractions in
    place. The model must be a timm ViT with its classifier (the ranking needs its predictions)."""
    check_ratios(neurons, heads)
    if not batches:
        raise UsageError("pruning needs images to rank the units on; the part's training subset is empty")
    heads_before, hidden_before = block_widths(model)
    params_before = sum(p.numel() for p in model.parameters())
    head_scores, neuron_scores = rank_units(model, batches)
    for block, hs, ns in zip(model.blocks, head_scores, neuron_scores):
        keep_heads_and_neurons(block, keep_top(hs, heads) if heads > 0 else None,
                               keep_top(ns, neurons) if neurons > 0 else None)
    heads_after, hidden_after = block_widths(model)
    return PruneResult(heads_after, hidden_after, heads_before, hidden_before, params_before,
                       sum(p.numel() for p in model.parameters()))
