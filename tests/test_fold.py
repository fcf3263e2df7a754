"""Folding is exact (randomized BN statistics), idempotent, and only fuses what it may."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effai import zoo
from effai.export.fold import count_params, fold
from effai.zoo.layers import NearestUpsample
from tests.helpers import SMALL, randomize_bn

ZOO = [n for n in zoo.CARDS.names() if zoo.CARDS.get(n).task == "image-classification"]   # VQA cards: test_ademvl
REPARAM = [n for n in ZOO if zoo.CARDS.get(n).reparameterizable
           and not zoo.CARDS.get(n).extra.get("arch_kwargs", {}).get("deploy")]   # shipped folded: nothing to do


def _input(name: str, batch: int) -> torch.Tensor:
    c, h, _ = zoo.CARDS.get(name).input_size
    size = h if name.startswith(("deit", "vit", "mixer")) else SMALL  # token models have a fixed patch grid
    return torch.randn(batch, c, size, size)


@pytest.mark.parametrize("name", ZOO)
def test_fold_is_exact_and_idempotent_on_every_zoo_model(name):
    model = zoo.create(name).model.eval()
    randomize_bn(model)
    torch.manual_seed(0)
    with torch.no_grad():   # timm zero-initializes some heads (MLP-Mixer): a zero output would compare nothing
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    x = _input(name, 2)
    with torch.no_grad():
        ref = model(x)
    report = fold(model, (x,))
    with torch.no_grad():
        out = model(x)
    scale = ref.abs().max()
    assert (out - ref).abs().max() / scale < 1e-5
    assert report.rel_err < 1e-5 and report.batchnorms_left == 0
    again = fold(model, (x,))
    assert again.reparameterized == {} and again.fused_conv_bn == 0 and again.rewritten == {}
    assert again.params_after == report.params_after


@pytest.mark.parametrize("name", REPARAM)
def test_reparameterizable_models_lose_parameters(name):
    model = zoo.create(name).model
    before = count_params(model)
    report = fold(model, (_input(name, 1),))
    assert report.reparameterized and report.params_after < before


@pytest.mark.parametrize("size", [64, 96, 224])
def test_ghostnetv3_fold_exact_at_several_sizes_with_dfc_rewrite(size):
    model = zoo.create("ghostnetv3_100").model.eval()
    randomize_bn(model, seed=size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    report = fold(model, (x,))
    assert sum(report.rewritten.values()) == 14      # every DFC gate of GhostNetV3 (blocks with index >= 2 in attn mode)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() / ref.abs().max() < 1e-5


class Shared(nn.Module):
    """conv output read by the BN and by a residual: fusing would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class InplaceBetween(nn.Module):
    """conv -> in-place ReLU -> BN: the BN's input is the conv's tensor object, but modified."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x), inplace=True))


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.conv, self.bn2 = nn.Linear(8, 5), nn.BatchNorm1d(5), nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)

    def forward(self, x):
        return torch.cat([self.bn(self.fc(x.flatten(1)[:, :8])), self.bn2(self.conv(x[:, :2])).mean((2, 3))], 1)


@pytest.mark.parametrize("cls,fused", [(Shared, 0), (InplaceBetween, 0), (LinearBN, 2)])
def test_generic_bn_fusion_fuses_only_safe_pairs(cls, fused):
    model = cls().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    report = fold(model, (x,))
    assert report.fused_conv_bn + report.fused_linear_bn == fused
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


@pytest.mark.parametrize("src,dst", [((3, 3), (7, 7)), ((4, 4), (7, 7)), ((7, 7), (14, 14)), ((2, 5), (5, 11)),
                                     ((28, 28), (56, 56)), ((1, 1), (3, 3))])
def test_nearest_upsample_equals_torch_nearest_exactly(src, dst):
    x = torch.randn(2, 3, *src)
    assert torch.equal(NearestUpsample(src, dst)(x), F.interpolate(x, size=dst, mode="nearest"))
