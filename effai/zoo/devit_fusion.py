"""DeViT's fusion head, the only model on the coordinator (Xu et al., arXiv:2309.05015; falcon-xu/DeViT
models/ensemble_models.py EnsMLP): f = concat(CLS_1, ..., CLS_N) (B, N * d_sub), the only data the devices send ->
h = project(f) (B, d_teacher), matched to the teacher's CLS feature (MSE) -> logits = classifier(h) (B, K).
`forward` also takes (B, N * d_sub, 1, 1), the 4-D layout `effai export` feeds (its card's input size is
(N * d_sub, 1, 1)), so the head exports like any image model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from effai.errors import UsageError
from effai.zoo.archs import ARCHS


class FusionHead(nn.Module):
    def __init__(self, parts: int, d_sub: int, d_teacher: int, num_classes: int) -> None:
        super().__init__()
        self.parts, self.d_sub, self.d_teacher, self.num_classes = parts, d_sub, d_teacher, num_classes
        self.project = nn.Linear(parts * d_sub, d_teacher)     # feature matching to the teacher's CLS width
        self.classifier = nn.Linear(d_teacher, num_classes)

    @property
    def in_features(self) -> int:
        return self.parts * self.d_sub

    def forward_features(self, f: Tensor) -> Tensor:
        if f.ndim == 4:
            f = f.flatten(1)
        if f.shape[-1] != self.in_features:
            raise UsageError(f"the fusion head takes {self.in_features} features ({self.parts} parts x {self.d_sub}), "
                             f"got {f.shape[-1]}; use the parts of the run that trained this head")
        return self.project(f)

    def forward(self, f: Tensor) -> Tensor:
        return self.classifier(self.forward_features(f))

    def fuse(self, features: Sequence[Tensor]) -> Tensor:
        """Logits from the N parts' CLS features, in part order; each must be (B, d_sub)."""
        check_widths([int(t.shape[-1]) for t in features], self.parts, self.d_sub)
        return self(torch.cat(list(features), dim=1))


def check_widths(widths: Sequence[int], parts: int, d_sub: int) -> None:
    """UsageError naming the part and both widths when parts and fusion head disagree."""
    if len(widths) != parts:
        raise UsageError(f"the fusion head fuses {parts} parts, got features from {len(widths)}; give all "
                         f"{parts} parts of the decomposition")
    for i, w in enumerate(widths):
        if w != d_sub:
            raise UsageError(f"part {i} gives {w}-wide CLS features but the fusion head expects d_sub={d_sub}; "
                             "use the parts trained with this fusion head (same effai train devit run)")


def build_fusion_head(num_classes: int, in_chans: int, parts: int, d_sub: int, d_teacher: int) -> FusionHead:
    """The `effai:devit_fusion` architecture; `in_chans` (the card's channel count) must be parts * d_sub."""
    if in_chans != parts * d_sub:
        raise UsageError(f"fusion head input width {in_chans} != {parts} parts x d_sub {d_sub} = {parts * d_sub}; "
                         "the checkpoint's card is inconsistent, re-save it with effai train devit")
    return FusionHead(parts, d_sub, d_teacher, num_classes)


class Ensemble(nn.Module):
    """The whole decomposition in one process: fusion head over the parts' CLS features. The single-process
    reference the distributed runtime (effai.devit_runtime) must reproduce."""

    def __init__(self, parts: Sequence[nn.Module], head: FusionHead) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.head = head

    def features(self, x: Tensor) -> list[Tensor]:
        return [p(x) for p in self.parts]

    def forward(self, x: Tensor) -> Tensor:
        return self.head.fuse(self.features(x))


ARCHS.register("devit_fusion", build_fusion_head)
