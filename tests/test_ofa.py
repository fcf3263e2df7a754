"""OFA-KD: the loss's invariants (docs/distill.md, OFA-KD), projectors for every registered family, feature capture
by module path, heterogeneous distillation both ways, and the exported student being the plain student."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from effai import zoo
from effai.errors import UsageError
from effai.train.distillers import OFA
from effai.zoo.features import FeatureCapture, resolve_module, stage_exits
from effai.train.losses.kd import kd_loss
from effai.train.losses.ofa import ofa_loss, ofa_target_weights
from effai.train.loop import train
from effai.train.projectors import PROJECTORS
from effai.train.recipes import make_config
from tests.helpers import run_cli

K = 10


def test_eps_1_gradient_equals_kd_gradient_at_t1():
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(8, K, requires_grad=True), torch.randn(8, K) * 3, torch.randint(0, K, (8,))
    (g_ofa,) = torch.autograd.grad(ofa_loss(z_s, z_t, y, eps=1.0), z_s)
    (g_kd,) = torch.autograd.grad(kd_loss(z_s, z_t, 1.0), z_s)
    assert torch.allclose(g_ofa, g_kd, atol=1e-7)
    expected = (torch.softmax(z_s, 1) - torch.softmax(z_t, 1)) / 8          # dL/dz_s = (p_s - p_t) / B
    assert torch.allclose(g_ofa, expected, atol=1e-7)
    (g_enh,) = torch.autograd.grad(ofa_loss(z_s, z_t, y, eps=1.5), z_s)   # eps > 1 is a different target
    assert not torch.allclose(g_enh, g_kd, atol=1e-4)


@pytest.mark.parametrize("eps", [1.0, 1.2, 1.5, 2.0])
def test_target_weight_is_enhanced_and_others_damped(eps):
    torch.manual_seed(1)
    p_t = torch.softmax(torch.randn(64, K) * 2, 1)
    y = torch.randint(0, K, (64,))
    w = ofa_target_weights(p_t, y, eps)
    gt = torch.nn.functional.one_hot(y, K).bool()
    assert torch.all(w[gt] >= p_t[gt] - 1e-7)                         # (1 + p)^eps - 1 >= p for eps >= 1
    assert torch.allclose(w[gt], (1 + p_t[gt]) ** eps - 1)
    assert torch.all(w[~gt] <= p_t[~gt] + 1e-7) and torch.allclose(w[~gt], p_t[~gt] ** eps)
    if eps > 1:
        assert torch.all(w[gt] > p_t[gt])


def _swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=2, in_chans=1, num_classes=K, window_size=4, embed_dim=16,
                           depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


# One student per registered family: a family registered without a model here fails the parametrized test.
FAMILY_STUDENTS = {
    "cnn": lambda: zoo.build(zoo.resolve_card("resnet10t").with_(input_size=(1, 32, 32), num_classes=K)),
    "vit": lambda: zoo.build(zoo.CARDS.get("vit_pico").with_(input_size=(1, 32, 32), num_classes=K,
                                                            extra={"arch_kwargs": {"patch_size": 2}})),   # 16x16 grid
    "mixer": lambda: zoo.build(zoo.CARDS.get("mixer_pico").with_(input_size=(1, 32, 32), num_classes=K)),
    "swin": _swin,
}


def _cfg(**kw):
    return replace(make_config("ofa", teacher="unused", student="resnet10t", channels=1, input_size=32), **kw)


@pytest.mark.parametrize("family", PROJECTORS.names())
def test_projector_maps_every_exit_to_logits_for_every_family(family):
    torch.manual_seed(0)
    student = FAMILY_STUDENTS[family]()
    teacher = zoo.build(zoo.CARDS.get("vit_pico").with_(input_size=(1, 32, 32), num_classes=K)).eval()
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, K, (4,))
    d = OFA(student, teacher, _cfg(), x)
    assert d.family == family and len(d.projectors) == len(d.exits) == 4
    with FeatureCapture(student, d.exits) as cap:
        student(x)
    for proj, f in zip(d.projectors, cap.outputs):
        assert proj(f).shape == (4, K)
    logits, losses = d(x, x, y)
    assert logits.shape == (4, K) and set(losses) == {"ce", "ofa", "ofa_exit1", "ofa_exit2", "ofa_exit3", "ofa_exit4"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.projectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    if family == "vit":   # a 16x16 grid gets one patch merging (floor(log2(16/7)) = 1)
        assert len(d.projectors[0].merges) == 1


# ---- the token projector against the reference (Hao840/OFAKD distillers/ofa.py + distillers/utils.py) ----------

class _RefPatchMerging(nn.Module):
    """distillers/utils.py PatchMerging: (B, H*W, C) -> 2x2 concat -> LayerNorm -> Linear(no bias) -> act."""

    def __init__(self, input_resolution, dim, out_dim, act_layer):
        super().__init__()
        self.input_resolution = input_resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = act_layer()

    def forward(self, x):
        h, w = self.input_resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
        return self.act(self.reduction(self.norm(x)))


class _RefTokenFnContext(nn.Module):
    """distillers/utils.py TokenFnContext(token_num, fn): fn on the patch tokens, the class tokens put back first."""

    def __init__(self, token_num, fn):
        super().__init__()
        self.token_num, self.fn = token_num, fn

    def forward(self, x):
        features = self.fn(x[:, self.token_num:])
        return features if self.token_num == 0 else torch.cat([x[:, :self.token_num], features], dim=1)


class _RefGetFeature(nn.Module):
    """TokenFilter(token_num, remove_mode=False) + Flatten for a class token, GAP1d (mean over tokens) without."""

    def __init__(self, token_num):
        super().__init__()
        self.token_num = token_num

    def forward(self, x):
        return x[:, :self.token_num].flatten(1) if self.token_num else x.mean(1)


def _ref_token_projector(patch_num, embed_dim, token_num, stage, feature_dim_s, num_classes):
    """distillers/ofa.py OFA.__init__, the non-CNN branch, verbatim in structure."""
    import numpy as np
    from timm.models.vision_transformer import Block

    patch_grid = int(patch_num ** .5)
    merge_num = max(int(np.log2(patch_grid / 7)), 0)
    mergers = []
    for i in range(merge_num):
        if i == 0:
            mergers.append(_RefPatchMerging((patch_grid // 2 ** i,) * 2, embed_dim, feature_dim_s, nn.GELU))
        else:
            mergers.append(_RefPatchMerging((patch_grid // 2 ** i,) * 2, feature_dim_s, feature_dim_s,
                                            nn.GELU if i != merge_num - 1 else nn.Identity))
    blocks = nn.Sequential(*[Block(dim=feature_dim_s, num_heads=4) for _ in range(max(4 - stage, 1))])
    return nn.Sequential(_RefTokenFnContext(token_num, nn.Sequential(*mergers)), blocks, _RefGetFeature(token_num),
                         nn.Linear(feature_dim_s, num_classes))


@pytest.mark.parametrize("grid,prefix,stage", [(14, 1, 4), (14, 1, 1), (28, 1, 2), (56, 0, 3), (7, 1, 3), (14, 0, 4)])
def test_token_projector_equals_the_reference(grid, prefix, stage):
    """Same weights, same output: one merge (14 x 14, ViT/DeiT-16 at 224, the paper's ImageNet case) has GELU, two
    merges GELU then none, three GELU GELU none; no norm after the blocks; class token or mean token."""
    from effai.train.projectors import TokenProjector, init_projector

    torch.manual_seed(grid + prefix + stage)
    dim = 16
    ours = TokenProjector(dim, (grid, grid), prefix, stage, dim, K)
    init_projector(ours)
    ref = _ref_token_projector(grid * grid, dim, prefix, stage, dim, K)
    src, dst = ours.state_dict(), ref.state_dict()
    assert [v.shape for v in src.values()] == [v.shape for v in dst.values()]   # same modules, same order
    ref.load_state_dict(dict(zip(dst, src.values())))
    ours.eval(), ref.eval()
    x = torch.randn(3, prefix + grid * grid, dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    gelus = [isinstance(m.act, nn.GELU) for m in ours.merges]
    assert gelus == {14: [True], 28: [True, False], 56: [True, True, False], 7: []}[grid]


def test_unsupported_family_and_bad_exits_are_clear_errors():
    class Flat(nn.Module):
        feature_info = [{"module": "a", "num_chs": 8, "reduction": 1}, {"module": "b", "num_chs": 8, "reduction": 2}]
        num_features = 8

        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(1024, 8), nn.Linear(8, 8), nn.Linear(8, K)

        def forward(self, x):
            return self.head(self.b(self.a(x.flatten(1))))

    teacher = zoo.build(zoo.resolve_card("resnet10t").with_(input_size=(1, 32, 32), num_classes=K)).eval()
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(UsageError, match=r"no OFA projector rule for Flat.*2-D.*cnn: \(B, C, H, W\).*PROJECTORS.register"):
        OFA(Flat(), teacher, _cfg(), x)
    student = zoo.build(zoo.CARDS.get("ghostnetv3_050").with_(input_size=(1, 64, 64), num_classes=K))
    with pytest.raises(UsageError, match=r"no module 'blocks.99'.*blocks\.9"):
        OFA(student, teacher, _cfg(exits=("blocks.99",)), torch.randn(2, 1, 64, 64))
    with pytest.raises(UsageError, match="needs 1 value or 5"):
        OFA(student, teacher, _cfg(ofa_eps=(1.0, 1.5)), torch.randn(2, 1, 64, 64))
    with pytest.raises(UsageError, match="distils from a teacher"):
        OFA(student, None, _cfg(), torch.randn(2, 1, 64, 64))
    assert stage_exits(student) == ["blocks.2", "blocks.4", "blocks.6", "blocks.9"]
    assert resolve_module(student, "blocks.9") is student.blocks[9]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, digits_npz):
    """A ViT and a CNN teacher, one short epoch each on 240 real digits at 32x32."""
    root = tmp_path_factory.mktemp("teachers")
    common = dict(data=str(digits_npz), channels=1, input_size=32, batch_size=32, epochs=1)
    train(make_config("supervised", student="vit_pico", out=str(root / "vit"), **common))
    train(make_config("supervised", student="resnet10t", out=str(root / "cnn"), **common))
    return root


@pytest.mark.parametrize("teacher,student,size,seed", [("vit", "resnet10t", 48, 0), ("cnn", "mixer_pico", 32, 1)])
def test_heterogeneous_ofa_both_ways_exports_the_plain_student(teachers, tmp_path, digits_npz, teacher, student, size,
                                                              seed):
    """ViT -> CNN (the student at 48 px, the ViT teacher sees its own 32 px) and CNN -> MLP-Mixer (another seed,
    so another held-out split than the teacher's: warned)."""
    out = tmp_path / "ofa"
    cfg = make_config("ofa", student=student, teacher=str(teachers / teacher), data=str(digits_npz), channels=1,
                      input_size=size, batch_size=32, epochs=2, out=str(out), seed=seed)
    assert cfg.optimizer == ("adamw" if student == "mixer_pico" else "sgd")
    result = train(cfg)
    assert bool(result["warnings"]) == (seed == 1)
    if seed == 1:
        assert "split_seed=0" in result["warnings"][0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    saved = load_file(str(out / "model.safetensors"))
    plain = zoo.build(zoo.resolve_card(student).with_(input_size=(1, 32, 32), num_classes=K))
    assert set(saved) == set(plain.state_dict())             # the projectors are gone: the plain student
    assert "aux" in torch.load(out / "checkpoint.pt", weights_only=True)   # projectors resume with the student
    if seed == 1:      # and resume is exact: stopped after epoch 0 then resumed == the uninterrupted run, bit for bit
        cut = replace(cfg, out=str(tmp_path / "cut"))

        def stop(epoch, model):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(cut, on_epoch_end=stop)
        train(cut, resume=True)
        resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
        assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], saved[k]) for k in saved)
    code, last, _, err = run_cli("export", "--weights", str(out / "model.safetensors"), "--target", "onnx",
                                 "--out", str(tmp_path / "art"), "--json")
    assert code == 0, err
    assert last["artifacts"][0]["parity"] == "pass" and result["val_acc"] > 0


def test_cli_bad_exit_path_and_unknown_set_key_exit_2_with_the_fix(teachers, tmp_path, digits_npz):
    common = ("--teacher", str(teachers / "vit"), "--data", str(digits_npz), "--input-size", "32", "--epochs", "1",
              "--json")
    code, last, _, _ = run_cli("train", "ofa", "--student", "resnet10t", *common, "--out", str(tmp_path / "c"))
    assert code == 2 and "--set channels=1" in last["error"]        # the npz is greyscale; default is RGB
    common = (*common, "--set", "channels=1")
    code, last, _, _ = run_cli("train", "ofa", "--student", "resnet10t", "--set", "exits=layer9", *common,
                               "--out", str(tmp_path / "a"))
    assert code == 2 and "has no module 'layer9'" in last["error"] and "layer4" in last["error"]
    assert not (tmp_path / "a" / "model.safetensors").exists()
    code, last, _, _ = run_cli("train", "ofa", "--set", "ofa_epsilon=2", *common, "--out", str(tmp_path / "b"))
    assert code == 2 and "did you mean 'ofa_eps'" in last["error"]
