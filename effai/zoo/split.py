"""Split points of a CNN (MAHPPO's DNN decoupling): cut a model into a device head and a server tail whose
composition is the whole model, exactly, and the feature autoencoder that compresses what crosses the cut.

    sp = split_model(model, (1, 64, 64)); head, tail = sp.cut("blocks.4")   # tail(head(x)) == model(x)
Method, formulas and measurements: docs/split.md.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from effai.errors import EffaiError, UsageError, choices_hint
from effai.zoo.features import feature_info, stage_exits

MAX_BITS = 8          # codes travel as one byte per value at most (uint8)


@dataclass(frozen=True)
class SplitPoint:
    """A cut after chain module `name` (a named_modules() path); `shape` is the feature C,H,W crossing it."""

    name: str
    index: int                      # position of `name` in the model's chain
    shape: tuple[int, int, int]

    @property
    def feature_bytes(self) -> int:
        """Bytes of the raw fp32 feature per image (what a split without an autoencoder transmits)."""
        return 4 * math.prod(self.shape)


def _chain(model: nn.Module, example: torch.Tensor, expand: set[str]) -> list[tuple[str, nn.Module]]:
    """The modules the forward pass runs, in order, with the nn.Sequential containers in `expand` opened up.
    EffaiError when a module runs twice (then the model is not a chain of its modules)."""
    def children(prefix: str, mod: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for n, c in mod.named_children():
            path = f"{prefix}{n}"
            if type(c) is nn.Sequential and any(e.startswith(path + ".") for e in expand):
                out.extend(children(path + ".", c))
            else:
                out.append((path, c))
        return out

    mods = children("", model)
    order: list[int] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, i=i: order.append(i)) for i, (_, m) in enumerate(mods)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if len(order) != len(set(order)):
        twice = sorted({mods[i][0] for i in order if order.count(i) > 1})
        raise EffaiError(f"{type(model).__name__} runs {', '.join(twice)} more than once per forward pass, so it is "
                         "not a chain of modules and cannot be split; split a CNN whose forward runs its modules in "
                         "order (effai zoo list)")
    return [mods[i] for i in order]


class SplitModel:
    """A model seen as a chain of modules, with its candidate split points (the last module of each stage)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], points: list[str] | None = None) -> None:
        self.model = model.eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        if points is None:
            info = feature_info(model)
            points = stage_exits(model, n=len({d.get("reduction", 0) for d in info}) or 4)
        example = torch.randn(2, *self.input_shape, generator=torch.Generator().manual_seed(0))
        self.chain = _chain(model, example, set(points))
        names = [n for n, _ in self.chain]
        shapes: dict[str, tuple[int, ...]] = {}
        x = example
        with torch.no_grad():
            for n, m in self.chain:
                x = m(x)
                shapes[n] = tuple(x.shape[1:])
            whole = model(example)
        if not (isinstance(x, torch.Tensor) and x.shape == whole.shape and torch.equal(x, whole)):
            raise EffaiError(f"{type(model).__name__}'s forward does work between its modules (running them in "
                             "order does not give its output), so it cannot be split exactly; split a model whose "
                             "forward is a chain of modules (GhostNetV3, ResNet, MobileNet)")
        self.points: list[SplitPoint] = []
        for p in points:
            if p not in shapes:
                raise UsageError(f"split point '{p}' is not a module of the forward chain; "
                                 f"{choices_hint(p, names)}")
            if len(shapes[p]) != 3 or names.index(p) == len(names) - 1:
                continue     # not a feature map (after pooling) or the output itself: nothing to split
            self.points.append(SplitPoint(p, names.index(p), tuple(int(s) for s in shapes[p])))  # type: ignore[arg-type]
        if not self.points:
            raise EffaiError(f"{type(model).__name__} has no split point with a feature map; name module paths")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def point(self, name: str) -> SplitPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise UsageError(f"unknown split point '{name}'; {choices_hint(name, self.names)} (the last module of "
                         "each stage, in execution order)")

    def cut(self, name: str) -> tuple[nn.Sequential, nn.Sequential]:
        """(head, tail): nn.Sequentials sharing the model's modules; tail(head(x)) equals model(x) bit for bit."""
        i = self.point(name).index
        def seq(items: list[tuple[str, nn.Module]]) -> nn.Sequential:
            return nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in items))
        return seq(self.chain[: i + 1]).eval(), seq(self.chain[i + 1:]).eval()


def split_model(model: nn.Module, input_shape: tuple[int, int, int], points: list[str] | None = None) -> SplitModel:
    return SplitModel(model, input_shape, points)


class FeatureAE(nn.Module):
    """MAHPPO's lightweight feature autoencoder (Hao et al., "Multi-agent collaborative inference via DNN decoupling",
    IEEE TMC 2022): a 1x1-conv encoder reduces C channels to c = ceil(C / reduction), the code is squashed to
    [0, 1] and uniformly quantized to q bits, and a 1x1-conv decoder restores C channels:
        s = sigmoid(BN(W_e x)),  k = round(s * (2^q - 1)) in {0..2^q-1},  x^ = BN(W_d (k / (2^q - 1)))
    Training passes gradients through the rounding with the straight-through estimator (Bengio et al. 2013):
    forward k, backward d k / d s = 2^q - 1. The device transmits k: c * H * W * q bits per image."""

    def __init__(self, channels: int, reduction: int = 4, bits: int = 8) -> None:
        super().__init__()
        if not 1 <= bits <= MAX_BITS:
            raise UsageError(f"bits={bits}: choose 1..{MAX_BITS} (codes travel as at most one byte per value)")
        if reduction < 1 or reduction > channels:
            raise UsageError(f"reduction={reduction}: choose 1..{channels} (the feature has {channels} channels)")
        self.channels, self.reduction, self.bits = channels, reduction, bits
        self.code_channels = math.ceil(channels / reduction)
        self.levels = float(2 ** bits - 1)
        self.encoder = nn.Sequential(nn.Conv2d(channels, self.code_channels, 1), nn.BatchNorm2d(self.code_channels))
        self.decoder = nn.Sequential(nn.Conv2d(self.code_channels, channels, 1), nn.BatchNorm2d(channels))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer code levels 0..2^q-1 (as float32; exact integers), with the straight-through gradient."""
        if x.shape[1] != self.channels:
            raise UsageError(f"feature has {x.shape[1]} channels but the autoencoder was built for {self.channels}; "
                             "use the autoencoder trained for this split point")
        s = torch.sigmoid(self.encoder(x)) * self.levels
        return s + (torch.round(s) - s).detach() if self.training else torch.round(s)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        if code.shape[1] != self.code_channels:
            raise UsageError(f"code has {code.shape[1]} channels but the decoder takes {self.code_channels}; the "
                             "device and server halves come from different autoencoders: export them together")
        return self.decoder(code / self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def code_bytes(self, h: int, w: int) -> int:
        """Bytes per image on the wire, packed: ceil(c * H * W * q / 8)."""
        return math.ceil(self.code_channels * h * w * self.bits / 8)


class DeviceHalf(nn.Module):
    """What the user device runs: the head, then (with an autoencoder) its encoder; outputs what is transmitted."""

    def __init__(self, head: nn.Module, ae: FeatureAE | None = None) -> None:
        super().__init__()
        self.head, self.ae = head, ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.ae.encode(f) if self.ae is not None else f


class ServerHalf(nn.Module):
    """What the edge server runs: (with an autoencoder) its decoder, then the tail; outputs the logits."""

    def __init__(self, tail: nn.Module, ae: FeatureAE | None = None) -> None:
        super().__init__()
        self.tail, self.ae = tail, ae

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.tail(self.ae.decode(code) if self.ae is not None else code)
