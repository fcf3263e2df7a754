"""The CDFKD-MFS multi-header student: one shared CNN backbone, one header per teacher, one exported module.

Header i: a_1 = SepConv(u_1, s2), a_k = SepConv([u_k || a_{k-1}], s2) over the backbone's 4 stage outputs, then GAP
and Linear_i; the output is the mean of the headers or an attention over them (Hao et al., IEEE TMM 2022,
arXiv:2205.11845). Registered as architecture `cdfkd_student`. Details: docs/distill.md, "effai/zoo/cdfkd_student.py".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import UsageError
from effai.zoo.archs import ARCHS
from effai.zoo.build import build, resolve_card
from effai.zoo.features import FeatureCapture, feature_info, stage_exits
from effai.zoo.layers import SepConv   # OFA-KD's and CDFKD-MFS's separable block (DARTS)

AGGREGATIONS = ("mean", "attention")
# Backbone options a checkpoint may carry (its metadata is untrusted: no paths, no pretrained/checkpoint options).
BACKBONE_KWARGS = ("channels", "stem_width", "base_width", "drop_rate", "drop_path_rate", "num_branches",
                   "scale_branch", "identity_bn")
NUM_EXITS = 4


class StageTrunk(nn.Module):
    """The backbone's modules, in registration order, from the input up to its last exit; forward returns the
    exits' outputs. Sequential containers holding an exit (`blocks.3`) are opened one level at a time."""

    def __init__(self, model: nn.Module, exits: Sequence[str]) -> None:
        super().__init__()
        self.exits = list(exits)
        chain: list[tuple[str, nn.Module]] = []
        if not _walk(model, "", set(self.exits), chain):
            raise UsageError(f"{type(model).__name__}: exits {self.exits} are not all reachable as a chain of its "
                             "modules; choose a timm-style CNN backbone (resnet10t, regnetx_002, mobilenetv3_*)")
        self.layers = nn.ModuleDict((path.replace(".", "_"), m) for path, m in chain)
        self.taps = [path.replace(".", "_") for path in self.exits]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            x = layer(x)
            outs[name] = x
        return [outs[t] for t in self.taps]


def _walk(module: nn.Module, prefix: str, exits: set[str], chain: list[tuple[str, nn.Module]]) -> bool:
    """Append (path, module) in order until every exit is passed; True when all were found."""
    for name, child in module.named_children():
        path = prefix + name
        if any(e.startswith(path + ".") for e in exits):
            if not isinstance(child, nn.Sequential):
                raise UsageError(f"exit inside {path} ({type(child).__name__}), which is not a plain Sequential; "
                                 "choose exits at stage boundaries (stage_exits picks them)")
            if _walk(child, path + ".", exits, chain):
                return True
            continue
        chain.append((path, child))
        exits.discard(path)
        if not exits:
            return True
    return False


class Header(nn.Module):
    """One teacher's header: SepConv chain over the shared stage outputs -> GAP -> feature -> Linear."""

    def __init__(self, exit_channels: Sequence[int], dim: int, num_classes: int) -> None:
        super().__init__()
        c = list(exit_channels)
        ins = [c[0]] + [2 * ci for ci in c[1:]]      # a_k sees [u_k || a_{k-1}], a_{k-1} has u_k's channels
        outs = c[1:] + [dim]
        self.stages = nn.ModuleList(SepConv(i, o) for i, o in zip(ins, outs))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, us: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.stages[0](us[0])
        for u, stage in zip(us[1:], self.stages[1:]):
            if a.shape[-2:] != u.shape[-2:]:
                a = F.adaptive_avg_pool2d(a, u.shape[-2:])
            a = stage(torch.cat([u, a], dim=1))
        f = a.mean(dim=(2, 3))
        return self.fc(f), f


class HeaderAttention(nn.Module):
    """w_i(x) = softmax_i(q . k_i / sqrt(d)), k_i = K_i f_i, q = Q mean_i k_i; output sum_i w_i s_i. Q = 0 at init."""

    def __init__(self, dims: Sequence[int], d: int = 64) -> None:
        super().__init__()
        self.d = d
        self.keys = nn.ModuleList(nn.Linear(di, d) for di in dims)
        self.query = nn.Linear(d, d)
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)

    def weights(self, feats: list[torch.Tensor]) -> torch.Tensor:
        k = torch.stack([key(f) for key, f in zip(self.keys, feats)], dim=1)      # B, N, d
        q = self.query(k.mean(dim=1))                                               # B, d
        return torch.softmax((k * q.unsqueeze(1)).sum(-1) / math.sqrt(self.d), dim=1)   # B, N

    def forward(self, logits: list[torch.Tensor], feats: list[torch.Tensor]) -> torch.Tensor:
        return (self.weights(feats).unsqueeze(-1) * torch.stack(logits, dim=1)).sum(dim=1)


class MultiHeaderStudent(nn.Module):
    def __init__(self, trunk: StageTrunk, exit_channels: Sequence[int], header_dims: Sequence[int], num_classes: int,
                 aggregation: str = "mean") -> None:
        super().__init__()
        self.backbone = trunk
        self.headers = nn.ModuleList(Header(exit_channels, d, num_classes) for d in header_dims)
        self.attention = HeaderAttention(header_dims) if aggregation == "attention" else None
        self.num_classes = num_classes
        self.arch_kwargs: dict[str, Any] = {}    # set by build_multi_header: what rebuilds this model

    def forward_heads(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-header logits s_i (B, K) and features f_i (B, d_i), backbone run once."""
        us = self.backbone(x)
        outs = [h(us) for h in self.headers]
        return [o[0] for o in outs], [o[1] for o in outs]

    def aggregate(self, logits: list[torch.Tensor], feats: list[torch.Tensor]) -> torch.Tensor:
        if self.attention is None:
            return torch.stack(logits, dim=0).mean(dim=0)
        return self.attention(logits, feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregate(*self.forward_heads(x))


def build_multi_header(num_classes: int, in_chans: int = 3, img_size: int = 32, backbone: str = "resnet10t",
                       backbone_kwargs: dict[str, Any] | None = None, exits: Sequence[str] | None = None,
                       exit_channels: Sequence[int] | None = None, header_dims: Sequence[int] | None = None,
                       aggregation: str = "mean") -> MultiHeaderStudent:
    """A multi-header student. Without `exits`/`exit_channels` they are found (stage_exits, one forward) and the
    trunk is checked against forward hooks on the intact backbone; a checkpoint's card passes them explicitly."""
    if aggregation not in AGGREGATIONS:
        raise UsageError(f"unknown aggregation '{aggregation}'; choose one of: {', '.join(AGGREGATIONS)}")
    if not header_dims or not all(isinstance(d, int) and d > 0 for d in header_dims):
        raise UsageError(f"header_dims must list one positive feature width per teacher, got {header_dims!r}")
    bk = dict(backbone_kwargs or {})
    bad = sorted(set(bk) - set(BACKBONE_KWARGS))
    if bad:
        raise UsageError(f"backbone options {bad} are not allowed; valid: {', '.join(BACKBONE_KWARGS)}")
    card = resolve_card(backbone).with_(input_size=(in_chans, img_size, img_size), num_classes=num_classes,
                                            label_set=None, extra={"arch_kwargs": bk})
    try:
        full = build(card)
    except TypeError as e:
        raise UsageError(f"student backbone '{backbone}' does not take options {sorted(bk)} ({e})") from e
    verify = exits is None or exit_channels is None
    if exits is None:
        exits = _cnn_stage_exits(full, backbone)
    trunk = StageTrunk(full, exits)
    if verify:
        exit_channels = _check_trunk(full, trunk, in_chans, img_size, backbone)
    if not all(isinstance(c, int) and c > 0 for c in exit_channels) or len(exit_channels) != len(trunk.exits) \
            or len(trunk.exits) != NUM_EXITS:
        raise UsageError(f"the student needs {NUM_EXITS} exits with one channel count each; got exits {list(exits)} "
                         f"and channels {list(exit_channels)}")
    model = MultiHeaderStudent(trunk, list(exit_channels), list(header_dims), num_classes, aggregation)
    model.arch_kwargs = {"backbone": backbone, "backbone_kwargs": bk, "exits": list(trunk.exits),
                         "exit_channels": [int(c) for c in exit_channels], "header_dims": [int(d) for d in header_dims],
                         "aggregation": aggregation}
    return model


def _cnn_stage_exits(model: nn.Module, name: str) -> list[str]:
    info = feature_info(model)
    reductions = [d.get("reduction", 0) for d in info]
    if len(set(reductions)) < NUM_EXITS:
        raise UsageError(f"student backbone '{name}' has {len(set(reductions))} downsampling stage(s); CDFKD-MFS "
                         f"headers need a CNN with {NUM_EXITS} (e.g. resnet10t, regnetx_002, mobilenetv3_small_100)")
    return stage_exits(model, NUM_EXITS)


@torch.no_grad()
def _check_trunk(full: nn.Module, trunk: StageTrunk, in_chans: int, img_size: int, name: str) -> list[int]:
    """The trunk must reproduce the intact backbone's stage outputs (captured by hooks); returns their channels."""
    was = full.training
    full.eval()
    x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    try:
        with FeatureCapture(full, trunk.exits) as cap:
            full(x)
        ref = cap.outputs
        got = trunk(x)
    except RuntimeError as e:
        raise UsageError(f"student backbone '{name}' fails at input {img_size}x{img_size} ({str(e).splitlines()[0]}); "
                         "use a larger --input-size or another backbone") from e
    finally:
        full.train(was)
    if any(r.shape != g.shape or not torch.allclose(r, g, atol=1e-5) for r, g in zip(ref, got)):
        raise UsageError(f"student backbone '{name}' does not run as a plain chain of its modules up to {trunk.exits}; "
                         "choose another CNN (resnet10t, regnetx_002, mobilenetv3_small_100)")
    return [int(g.shape[1]) for g in got]


build_multi_header.takes_img_size = True  # type: ignore[attr-defined]
ARCHS.register("cdfkd_student", build_multi_header)
