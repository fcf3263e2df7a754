"""CDFKD-MFS: generator, BN-statistics prior, losses, the multi-header student, the loop (collapse, exact resume),
and the exported student. Teachers are random-init timm CNNs (randomized BN statistics) saved as effai checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from effai import zoo
from effai.errors import UsageError
from effai.train.cdfkd import CdfkdConfig, train_cdfkd
from effai.train.cdfkd.generator import Generator
from effai.train.cdfkd.losses import BNStatistics, generator_loss, student_loss
from effai.train.cdfkd.loop import GeneratorCollapsed, collapse_reason, generator_step
from effai.zoo.cdfkd_student import HeaderAttention, StageTrunk, build_multi_header
from effai.train.cdfkd.teachers import TeacherEnsemble, load_teachers
from effai.zoo.features import FeatureCapture, stage_exits
from tests.helpers import randomize_bn, run_cli

SIZE = 32
NARROW = (8, 16, 32, 64)    # timm ResNet stage widths of the tiny test student
RUN = dict(iterations=4, eval_every=2, batch_size=8, student_steps=2, student_channels=NARROW)


def save_teacher(path: Path, arch: str, seed: int, classes: int = 10, size: int = SIZE) -> str:
    """A random-init model with randomized BN statistics, saved with an effai card like `effai train` writes."""
    torch.manual_seed(seed)
    if arch == "vit_pico":   # no BatchNorm at all
        from effai.zoo.vit import vit

        model, source = vit("vit_pico", img_size=size, in_chans=1, num_classes=classes), "effai:vit_pico"
    else:
        import timm

        model, source = timm.create_model(arch, num_classes=classes, in_chans=1), f"timm:{arch}"
        randomize_bn(model, seed)
    card = {"name": arch, "family": arch, "source": source, "input_size": [1, size, size], "mean": [0.5],
            "std": [0.5], "num_classes": classes, "interpolation": "bilinear", "crop_pct": 1.0, "arch_kwargs": {}}
    meta = {"effai.card": json.dumps(card), "labels": json.dumps([str(i) for i in range(classes)]),
            "effai.train": json.dumps({"config": {"data": "digits", "seed": 0}, "val_acc": 0.1})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return str(path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> tuple[str, ...]:
    root = tmp_path_factory.mktemp("teachers")
    return tuple(save_teacher(root / f"t{i}.safetensors", a, i)
                 for i, a in enumerate(("resnet10t", "resnet10t", "regnetx_002")))


@pytest.fixture(scope="module")
def run(teachers, tmp_path_factory):
    """One uninterrupted tiny run (4 iterations, checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("run")
    return train_cdfkd(CdfkdConfig(teachers=teachers, out=str(out), **RUN))


def test_generator_shape_and_batchnorm_normalized_output():
    torch.manual_seed(0)
    g = Generator(nz=32, img_size=SIZE, channels=3).train()
    with FeatureCapture(g, ["out.1"]) as cap:      # the tanh output, BN(affine=False)'s input
        x = g(torch.randn(16, 32))
    assert x.shape == (16, 3, SIZE, SIZE)
    v = cap.outputs[0].var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)     # per channel over the batch:
    assert torch.allclose(x.var(dim=(0, 2, 3), unbiased=False), v / (v + 1e-5), atol=1e-5)   # mean 0, var v/(v+eps)
    last = g.out[-1]
    assert last.weight is None and last.bias is None
    assert [m.eps for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [1e-5, 0.8, 0.8, 1e-5]
    assert g.project.out_features == 128 * (SIZE // 4) ** 2
    with pytest.raises(UsageError, match="multiple of 4"):
        Generator(img_size=30)


class _Flatten(torch.nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


def _ref_generator(kind: str, nz: int, img_size: int, nc: int) -> torch.nn.Module:
    """Hao840/CDFKD-MFS nets/gan.py: Generator (32 px), GeneratorLarge (128 px), GeneratorLargeBN (224 px), their
    modules in their order (the reference's forward: l1 -> view -> BN -> up2 -> block1 -> up2 -> block2 -> out for
    Generator, project -> view -> main for the large ones)."""
    nn = torch.nn
    if kind == "small":
        s = img_size // 4

        class Ref(nn.Module):
            def __init__(self):
                super().__init__()
                self.l1 = nn.Sequential(nn.Linear(nz, 128 * s ** 2))
                self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
                self.conv_blocks1 = nn.Sequential(nn.Conv2d(128, 128, 3, stride=1, padding=1),
                                                  nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2, inplace=True))
                self.conv_blocks2 = nn.Sequential(nn.Conv2d(128, 64, 3, stride=1, padding=1),
                                                  nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2, inplace=True))
                self.out_block = nn.Sequential(nn.Conv2d(64, nc, 3, stride=1, padding=1), nn.Tanh(),
                                               nn.BatchNorm2d(nc, affine=False))

            def forward(self, z):
                img = self.conv_blocks0(self.l1(z).view(z.shape[0], 128, s, s))
                img = self.conv_blocks1(F.interpolate(img, scale_factor=2))
                img = self.conv_blocks2(F.interpolate(img, scale_factor=2))
                return self.out_block(img)

        return Ref()
    s = img_size // 16
    main = [nn.BatchNorm2d(64 * 8)]
    for c_in, c_out in ((64 * 8, 64 * 4), (64 * 4, 64 * 2), (64 * 2, 64), (64, 64)):
        main += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                 nn.LeakyReLU(0.2, inplace=True)]
    main += [nn.Conv2d(64, nc, 3, 1, 1), nn.Tanh()] + ([nn.BatchNorm2d(nc, affine=False)] if kind == "large_bn" else [])

    class RefLarge(nn.Module):
        def __init__(self):
            super().__init__()
            self.project = nn.Sequential(_Flatten(), nn.Linear(nz, 64 * 8 * s * s))
            self.main = nn.Sequential(*main)

        def forward(self, z):
            proj = self.project(z)
            return self.main(proj.view(proj.shape[0], -1, s, s))

    return RefLarge()


@pytest.mark.parametrize("size,kind", [(32, "small"), (128, "large"), (224, "large_bn"), (16, "small"),
                                       (64, "small"), (160, "large")])
def test_generator_is_the_reference_for_the_input_size(size, kind):
    """kind='auto' picks what the reference's registry uses (CIFAR-100 32 px: Generator; Caltech-101 128 px:
    GeneratorLarge; mini-ImageNet 224 px: GeneratorLargeBN); with the same weights the outputs are equal."""
    torch.manual_seed(size)
    nz = 8
    ours = Generator(nz=nz, img_size=size, channels=3)
    assert ours.kind == kind
    ref = _ref_generator(kind, nz, size, 3)
    src, dst = ours.state_dict(), ref.state_dict()
    assert [v.shape for v in src.values()] == [v.shape for v in dst.values()]   # same modules, same order
    ref.load_state_dict(dict(zip(dst, src.values())))
    z = torch.randn(2, nz)
    for mode in (True, False):                                    # batch statistics and running statistics
        ours.train(mode), ref.train(mode)
        with torch.no_grad():
            x = ours(z)
            torch.testing.assert_close(x, ref(z), rtol=0, atol=1e-5)
    assert x.shape == (2, 3, size, size)
    assert ours.kind == Generator(nz, size, 3, kind=kind).kind


def test_generator_choice_is_an_option_and_sizes_are_checked(teachers):
    assert Generator(8, 128, 1, kind="small").kind == "small"     # any generator at any size it can make
    assert Generator(8, 32, 1, kind="large").kind == "large"
    with pytest.raises(UsageError, match="generator 'dcgan'; choose one of: auto, small, large, large_bn"):
        Generator(8, 32, 1, kind="dcgan")
    with pytest.raises(UsageError, match="multiple of 16"):
        Generator(8, 136, 1)
    with pytest.raises(UsageError, match="--input-size 136 must be a multiple of 16 for the large generator"):
        CdfkdConfig(teachers=teachers, input_size=136)
    with pytest.raises(UsageError, match="unknown CDFKD generator"):
        CdfkdConfig(teachers=teachers, generator="big")
    assert CdfkdConfig(teachers=teachers, input_size=136, generator="small").generator == "small"
    assert CdfkdConfig(teachers=teachers).to_dict()["generator"] == "auto"


def test_bn_term_is_zero_at_matching_statistics_and_scales_the_first_bn():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=NARROW).eval()
    x = torch.randn(8, 1, SIZE, SIZE)
    bns = BNStatistics(model)
    assert len(bns) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 3
    with torch.no_grad():
        for bn in bns.layers:   # module order = forward order here: set each BN's running stats to its batch stats
            with FeatureCapture(model, [n for n, m in model.named_modules() if m is bn], where="input") as cap:
                model(x)
            inp = cap.outputs[0]
            bn.running_mean.copy_(inp.mean(dim=(0, 2, 3)))
            bn.running_var.copy_(inp.transpose(0, 1).reshape(inp.shape[1], -1).var(dim=1, unbiased=False))
        with bns:
            model(x)
            assert float(bns.loss()) == pytest.approx(0.0, abs=1e-6)
    randomize_bn(model, 1)     # any statistics: the term is sum_l r_l (||mu_l - mu_run|| + ||var_l - var_run||)
    names = [n for b in bns.layers for n, m in model.named_modules() if m is b]
    with torch.no_grad(), FeatureCapture(model, names, where="input") as cap, bns:
        model(x)
        got = float(bns.loss())
    want = 0.0
    for i, (inp, bn) in enumerate(zip(cap.outputs, bns.layers)):
        a = inp.transpose(0, 1).reshape(inp.shape[1], -1).double().numpy()
        d = (np.linalg.norm(a.mean(1) - bn.running_mean.double().numpy())
             + np.linalg.norm(a.var(1) - bn.running_var.double().numpy()))
        want += (5.0 if i == 0 else 1.0) * d
    assert got == pytest.approx(want, rel=1e-4)
    assert BNStatistics(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))).loss() is None   # no BN: no term


def test_student_and_generator_losses_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 5, generator=g) for _ in range(3)]
    t = [torch.randn(4, 5, generator=g) for _ in range(3)]
    fs = [torch.randn(4, d, generator=g) for d in (6, 7, 8)]
    ft = [torch.randn(4, d, generator=g) for d in (6, 7, 8)]
    l1 = [np.abs(a.numpy() - b.numpy()).mean() for a, b in zip(s, t)]
    feat = [np.abs(a.numpy() - b.numpy()).sum(1).mean() for a, b in zip(fs, ft)]
    ens = np.abs(np.mean([a.numpy() for a in s], 0) - np.mean([b.numpy() for b in t], 0)).mean()
    total, parts = student_loss(s, t, fs, ft)
    assert float(total) == pytest.approx(np.mean(l1) + 0.2 * np.mean(feat) + 5 * ens, rel=1e-5)
    assert parts["loss_ens"] == pytest.approx(5 * ens, rel=1e-5)
    bn = [torch.tensor(2.0), None, torch.tensor(4.0)]      # the middle teacher has no BatchNorm
    loss_g, _ = generator_loss(s, t, bn)
    assert float(loss_g) == pytest.approx(sum(-x / 3 for x in l1) + 0.1 * (2.0 + 4.0) / 3, rel=1e-5)


def test_shared_backbone_distinct_headers_and_gradients():
    torch.manual_seed(0)
    dims = [24, 16, 40]
    st = build_multi_header(10, 1, SIZE, "resnet10t", backbone_kwargs={"channels": list(NARROW)}, header_dims=dims)
    randomize_bn(st)            # timm zero-inits each block's last BN gamma, which would block some gradients
    assert len(st.headers) == 3 and st.arch_kwargs["exit_channels"] == list(NARROW)
    ids = [{id(p) for p in h.parameters()} for h in st.headers]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    backbone = {id(p) for p in st.backbone.parameters()}
    assert not backbone & set().union(*ids)
    assert sum(1 for _ in st.parameters()) == len(backbone) + sum(len(i) for i in ids)   # one backbone copy
    x = torch.randn(4, 1, SIZE, SIZE)
    logits, feats = st.forward_heads(x)
    assert [tuple(f.shape) for f in feats] == [(4, d) for d in dims] and all(z.shape == (4, 10) for z in logits)
    assert torch.allclose(st(x), torch.stack(logits).mean(0), atol=1e-6)
    for i in range(3):          # header i alone: its gradient reaches the backbone, and no other header
        st.zero_grad(set_to_none=True)
        st.forward_heads(x)[0][i].square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.backbone.parameters())
        for j, h in enumerate(st.headers):
            assert all((p.grad is not None) == (j == i) for p in h.parameters())


@pytest.mark.parametrize("arch", ["resnet10t", "mobilenetv3_small_050"])
def test_trunk_reproduces_the_hooked_stage_outputs(arch):
    import timm

    model = timm.create_model(arch, num_classes=10, in_chans=1).eval()
    exits = stage_exits(model)
    trunk = StageTrunk(model, exits)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad(), FeatureCapture(model, exits) as cap:
        model(x)
        got = trunk(x)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(cap.outputs, got))
    with pytest.raises(UsageError, match="downsampling stage"):
        build_multi_header(10, 1, SIZE, "vit_pico", header_dims=[8])


def test_attention_starts_as_the_mean_and_learns_to_trust_the_right_header():
    torch.manual_seed(0)
    att = HeaderAttention([6, 6, 6])
    y = torch.randint(0, 4, (64,))
    logits = [torch.randn(64, 4) for _ in range(3)]
    logits[1] = F.one_hot(y, 4).float() * 5                     # header 1 is always right
    feats = [torch.randn(64, 6) for _ in range(3)]
    feats[1] = feats[1] + 2.0                                   # ... and recognisable from its feature
    assert torch.allclose(att(logits, feats), torch.stack(logits).mean(0), atol=1e-6)
    opt = torch.optim.Adam(att.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(att(logits, feats), y).backward()
        opt.step()
    assert float(att.weights(feats)[:, 1].mean()) > 0.8


def test_generator_step_raises_the_discrepancy(teachers):
    ens = TeacherEnsemble(load_teachers(teachers))
    torch.manual_seed(0)
    st = build_multi_header(10, 1, SIZE, "resnet10t", backbone_kwargs={"channels": list(NARROW)},
                            header_dims=[t.dim for t in ens.teachers]).train()
    gen = Generator(nz=32, img_size=SIZE, channels=1).train()
    cfg = CdfkdConfig(teachers=teachers, nz=32, batch_size=16, bn_weight=0.0)    # the adversarial term alone
    z = torch.randn(16, 32)

    def discrepancy() -> float:
        with torch.no_grad():
            x = gen(z)
            s, _ = st.forward_heads(x)
            t, _ = ens.logits_and_features(x)
        return float(sum(F.l1_loss(a, b) for a, b in zip(s, t)))

    before = {k: v.detach().clone() for k, v in st.named_parameters()}
    d0 = discrepancy()
    parts = generator_step(st, gen, ens, torch.optim.Adam(gen.parameters(), lr=1e-4), cfg, z=z)   # a small step
    assert discrepancy() > d0 and parts["loss_g_bn"] == 0.0
    assert all(torch.equal(v, p) for (k, v), p in zip(before.items(), st.parameters()))   # the student is untouched
    assert all(p.requires_grad for p in st.parameters())


def test_collapse_reasons():
    assert collapse_reason(x=torch.randn(4, 1, 8, 8)) is None
    assert "non-finite" in collapse_reason(x=torch.full((4, 1, 8, 8), float("nan")))
    assert "constant" in collapse_reason(x=torch.full((4, 1, 8, 8), 0.3))
    assert "inf loss" in collapse_reason(loss=torch.tensor(float("inf")))


def test_config_and_teacher_errors(teachers, tmp_path):
    with pytest.raises(UsageError, match="needs teachers"):
        CdfkdConfig(teachers=())
    with pytest.raises(UsageError, match="real-samples"):
        CdfkdConfig(teachers=teachers, aggregation="attention")
    assert CdfkdConfig(teacher="a", teachers=("b",)).teachers == ("a", "b")
    five = save_teacher(tmp_path / "five.safetensors", "resnet10t", 5, classes=5)
    with pytest.raises(UsageError, match="disagree on the classes.*predicts 10.*5"):
        train_cdfkd(CdfkdConfig(teachers=(teachers[0], five), out=str(tmp_path / "a")))
    small = save_teacher(tmp_path / "small.safetensors", "resnet10t", 6, size=16)
    with pytest.raises(UsageError, match="disagree on the input"):
        train_cdfkd(CdfkdConfig(teachers=(teachers[0], small), out=str(tmp_path / "b")))
    vit = save_teacher(tmp_path / "vit.safetensors", "vit_pico", 7)
    with pytest.raises(UsageError, match="no teacher has BatchNorm"):
        train_cdfkd(CdfkdConfig(teachers=(vit,), out=str(tmp_path / "c")))
    with pytest.raises(UsageError, match="not an effai training run"):
        train_cdfkd(CdfkdConfig(teachers=(str(tmp_path / "nowhere"),), out=str(tmp_path / "d")))


def test_run_writes_a_student_with_one_header_per_teacher(run, teachers):
    out = Path(run["out"])
    assert (out / "checkpoint.pt").is_file() and [r["iteration"] for r in run["history"]] == [2, 4]
    loaded = zoo.create(weights=out / "model.safetensors")
    st = loaded.model
    assert len(st.headers) == len(teachers) and loaded.card.source == "effai:cdfkd_student"
    assert st.arch_kwargs["header_dims"] == [512, 512, 368]     # each teacher's pre-logits width
    record = loaded.card.extra["train_record"]
    assert len(record["teachers"]) == 3 and all(0 <= t["val_acc"] <= 1 for t in record["teachers"])
    assert record["iterations"] == 4 and record["minutes"] > 0 and record["val_acc"] == run["val_acc"]
    with pytest.raises(UsageError, match="already holds a finished training run"):
        train_cdfkd(CdfkdConfig(teachers=teachers, out=str(out), **RUN))


def test_collapse_stops_with_the_checkpoint_kept_and_resume_is_exact(run, teachers, tmp_path, monkeypatch):
    out = tmp_path / "collapsing"
    calls = {"n": 0}
    forward = Generator.forward

    def failing(self, z):       # the 7th generator call = the first of iteration 3 (3 calls per iteration)
        calls["n"] += 1
        x = forward(self, z)
        return x * float("nan") if calls["n"] == 7 else x

    monkeypatch.setattr(Generator, "forward", failing)
    with pytest.raises(GeneratorCollapsed, match=r"iteration 3: non-finite.*checkpoint \(iteration 2\)"):
        train_cdfkd(CdfkdConfig(teachers=teachers, out=str(out), **RUN))
    monkeypatch.setattr(Generator, "forward", forward)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 2
    with pytest.raises(UsageError, match="resume=true"):
        train_cdfkd(CdfkdConfig(teachers=teachers, out=str(out), **RUN))
    resumed = train_cdfkd(CdfkdConfig(teachers=teachers, out=str(out), resume=True, **RUN))
    a, b = load_file(run["model_path"]), load_file(resumed["model_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_attention_aggregation_from_a_few_real_samples(teachers, tmp_path):
    r = train_cdfkd(CdfkdConfig(teachers=teachers, out=str(tmp_path), iterations=1, eval_every=1, batch_size=8,
                                student_steps=1, student_channels=NARROW, real_samples=20, attention_steps=30, seed=3))
    assert r["attention"]["samples"] == 20 and sum(r["attention"]["mean_weights"]) == pytest.approx(1.0, abs=1e-5)
    loaded = zoo.create(weights=r["model_path"])
    st = loaded.model.eval()
    assert st.arch_kwargs["aggregation"] == "attention" and loaded.card.extra["train_record"]["attention"]
    assert loaded.card.extra["split"]["seed"] == 0 == r["split_seed"]    # the teachers' split, not the student seed
    assert float(st.attention.query.weight.abs().sum()) > 0          # trained away from the mean-of-headers start
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        heads, feats = st.forward_heads(x)
        w = st.attention.weights(feats)
        assert torch.allclose(st(x), (w.unsqueeze(-1) * torch.stack(heads, 1)).sum(1), atol=1e-5)


def test_exported_student_has_parity_and_outputs_the_mean_of_its_headers(run, tmp_path):
    import onnxruntime as ort

    code, last, stdout, stderr = run_cli("export", "--weights", run["model_path"], "--target", "onnx", "--eval", "none",
                                         "--out", str(tmp_path / "onnx"))
    assert code == 0, stderr[-2000:]
    art = last["artifacts"][0]
    assert art["parity"] == "pass" and art["max_abs_err"] < 1e-4
    st = zoo.create(weights=run["model_path"]).model.eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        heads, _ = st.forward_heads(x)
    sess = ort.InferenceSession(art["file"])
    got = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1].numpy()})[0] for i in range(2)])
    assert np.allclose(got, torch.stack(heads).mean(0).numpy(), atol=1e-4)
