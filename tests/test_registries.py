"""Every registry entry against its registry's contract, parametrized over `REGISTRY.names()` as timm's tests are:
an entry registered later is checked here without editing this file. Cheap by design (tiny inputs, no export, no
training); entries that need other inputs or are too heavy to build say so in ARCH_CASES / HEAVY_ARCHS below."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import effai.zoo  # noqa: F401  (registers the composite architectures: cdfkd_student, devit_fusion, ...)
from effai.device_bench.meters import AUTO_ORDER, METERS
from effai.device_bench.runners import FORMS, RUNNERS, parse_spec
from effai.errors import UsageError
from effai.export.plan import plan
from effai.export.precisions import PRECISIONS
from effai.export.rewrites import REWRITES
from effai.export.targets import TARGETS
from effai.export.targets.base import LAYER_KINDS, LayerRule
from effai.train.distillers import DISTILLERS, Distiller
from effai.train.losses import LOSSES, KDParams
from effai.train.projectors import PROJECTORS
from effai.train.recipes import RECIPES, TrainConfig, make_config
from effai.zoo.archs import ARCHS
from effai.zoo.card import ModelCard
from effai.zoo.catalog import CARDS

REGISTRIES = {"TARGETS": TARGETS, "PRECISIONS": PRECISIONS, "REWRITES": REWRITES, "ARCHS": ARCHS, "CARDS": CARDS,
              "LOSSES": LOSSES, "DISTILLERS": DISTILLERS, "PROJECTORS": PROJECTORS, "RECIPES": RECIPES,
              "METERS": METERS, "RUNNERS": RUNNERS}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and the only fair share on a loaded 2-core host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- every registry ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", sorted(REGISTRIES))
def test_a_registry_is_populated_and_an_unknown_name_lists_the_choices(label):
    reg = REGISTRIES[label]
    names = reg.names()
    assert names and names == sorted(names), label
    with pytest.raises(UsageError) as e:
        reg.get("no-such-entry")
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert f"unknown {reg.kind} 'no-such-entry'" in msg and "choose one of:" in msg
    for name in names[:30]:     # choices_hint lists the first 30 and the count
        assert name in msg, (label, name)


# --- TARGETS ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TARGETS.names())
def test_target_declares_a_consistent_contract(name):
    t = TARGETS.get(name)
    assert t.name == name and isinstance(t.description, str) and t.description.strip()
    assert isinstance(t.precisions, tuple) and t.precisions, "the first precision is the default: one is needed"
    assert len(set(t.precisions)) == len(t.precisions)
    assert set(t.precisions) <= set(PRECISIONS.names()), set(t.precisions) - set(PRECISIONS.names())
    assert set(t.unsupported) <= set(PRECISIONS.names())
    assert not set(t.unsupported) & set(t.precisions), "a precision is offered and refused at once"
    assert all(isinstance(why, str) and why.strip() for why in t.unsupported.values())
    assert set(t.quantizes) <= set(t.precisions), "layer rules for a precision the target does not take"
    for rule in t.quantizes.values():
        assert isinstance(rule, LayerRule) and rule.kinds <= set(LAYER_KINDS) and rule.min_weights >= 0
    assert isinstance(t.needs_exported_program, bool) and isinstance(t.metadata_modifies_model, bool)
    for method in ("available", "lower", "load", "structural_check", "write_metadata"):
        assert callable(getattr(t, method)), method


@pytest.mark.parametrize("name", TARGETS.names())
def test_target_available_never_raises_and_names_the_install_when_missing(name, monkeypatch):
    import importlib.util

    ok, detail = TARGETS.get(name).available()
    assert isinstance(ok, bool) and isinstance(detail, str) and detail.strip()
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)   # no toolchain on this host
    ok, detail = TARGETS.get(name).available()
    assert ok is False and "pip install" in detail, detail


@pytest.mark.parametrize("name", TARGETS.names())
def test_plan_takes_exactly_the_precisions_a_target_lists(name):
    t = TARGETS.get(name)
    assert plan(name) == plan(name, t.precisions[0]) and plan(name).ok
    for p in PRECISIONS.names():
        got = plan(name, p)
        assert got.ok == (p in t.precisions), (name, p)
        if not got.ok:
            assert name in got.reason and t.precisions[0] in got.reason and "\n" not in got.reason
            if p in t.unsupported:
                assert t.unsupported[p] in got.reason
    with pytest.raises(UsageError, match="unknown --quantize 'int3'; .*int8"):
        plan(name, "int3")


# --- PRECISIONS, REWRITES -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRECISIONS.names())
def test_precision_is_described_and_offered_by_some_target(name):
    p = PRECISIONS.get(name)
    assert p.name == name and p.description.strip() and 1 <= p.weight_bits <= 32
    assert p.quantized == (p.weight_bits < 16), "quantized means below the float precisions"
    assert not p.needs_calibration or p.quantized
    assert any(name in TARGETS.get(t).precisions for t in TARGETS.names()), f"no target offers {name}"


@pytest.mark.parametrize("name", REWRITES.names())
def test_rewrite_names_a_module_class_and_known_targets(name):
    description, rewrite, targets = REWRITES.get(name)
    assert name.isidentifier() and description.strip() and callable(rewrite)
    assert targets is None or (targets and set(targets) <= set(TARGETS.names())), targets


# --- ARCHS ------------------------------------------------------------------------------------------------------------
# How to build an architecture whose factory needs more than (num_classes, in_chans[, img_size]), and its input.
ARCH_CASES = {
    "cdfkd_student": ({"header_dims": [8, 8]}, (2, 1, 32, 32)),          # resnet10t trunk + 2 headers
    "devit_fusion": ({"in_chans": 8, "parts": 2, "d_sub": 4, "d_teacher": 8}, (2, 8)),   # fuses 2 CLS features
}
# Architectures too heavy to build within this file's budget, with the test that builds and runs them.
HEAVY_ARCHS = {"ademvl": "loads a language model (~35 s on the 2-core host); built and run by tests/test_ademvl.py",
               "delvm": "an image generator (VQ tokenizer + LM), not logits; built and run by tests/test_delvm.py",
               "srdiff": "a super-resolver (LR -> HR image), not logits; built and run by tests/test_superres.py"}


@pytest.mark.parametrize("name", ARCHS.names())
def test_arch_builds_runs_a_tiny_input_and_trains(name):
    if name in HEAVY_ARCHS:
        pytest.skip(HEAVY_ARCHS[name])
    factory = ARCHS.get(name)
    extra, shape = ARCH_CASES.get(name, ({}, (2, 1, 64, 64)))
    kwargs = {"num_classes": 3, "in_chans": shape[1], **extra}
    if getattr(factory, "takes_img_size", False):
        kwargs["img_size"] = shape[-1]
    torch.manual_seed(0)
    model = factory(**kwargs)
    assert isinstance(model, nn.Module)
    x = torch.randn(*shape)
    model.train()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (shape[0], 3) and torch.isfinite(out).all(), \
        f"{name}: expected logits (B, num_classes); if it needs other arguments or inputs, add it to ARCH_CASES"
    (out.float() * torch.randn(out.shape)).sum().backward()    # zero-initialized heads still get a gradient
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reaches the weights"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x)), "eval mode is not deterministic"


# --- CARDS ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CARDS.names())
def test_card_is_buildable_and_describes_its_input(name):
    import timm

    from effai.data.photos import _ORDERS
    from effai.zoo import resolve_card
    from effai.zoo.labels import label_set

    card = CARDS.get(name)
    assert isinstance(card, ModelCard) and card.name == name and resolve_card(name) is card
    kind, _, ref = card.source.partition(":")
    assert kind in ("effai", "timm"), card.source
    assert ref in ARCHS if kind == "effai" else timm.is_model(ref), f"{card.source} names no architecture"
    c, h, w = card.input_size
    assert all(isinstance(v, int) and v > 0 for v in (c, h, w))
    assert len(card.mean) == len(card.std) == c and min(card.std) > 0, "mean/std need one value per channel"
    assert card.interpolation in _ORDERS and 0 < card.crop_pct <= 1
    assert card.description.strip() and card.weights_license.strip() and card.family.strip()
    assert card.num_classes >= 0        # 0: a model whose output is not class scores (e.g. a language model's vocab)
    if card.label_set is not None:
        assert label_set(card.label_set, card.num_classes) != tuple(f"class_{i}" for i in range(card.num_classes)), \
            f"label set {card.label_set} unknown or not of {card.num_classes} classes"
    if card.bundled_weights:
        assert (Path(effai.zoo.__file__).parent / "weights" / card.bundled_weights).exists()
    d = json.loads(json.dumps(card.to_dict()))
    back = ModelCard.from_dict(d)
    for f in ("name", "family", "source", "input_size", "mean", "std", "num_classes", "interpolation", "crop_pct"):
        assert getattr(back, f) == getattr(card, f), f
    assert back.extra["arch_kwargs"] == card.extra.get("arch_kwargs", {})


# --- LOSSES -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 3, torch.tensor([0, 1, 2, 4])


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_is_a_finite_differentiable_scalar(name, logits):
    z_s, z_t, y = logits
    loss_fn = LOSSES.get(name)
    z = z_s.clone().requires_grad_(True)
    loss = loss_fn(z, z_t, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    hot = loss_fn(z_s, z_t, y, KDParams(temperature=4.0))       # the recipes pass their hyper-parameters
    assert hot.dim() == 0 and torch.isfinite(hot)
    with pytest.raises(ValueError):                               # shapes are checked, never broadcast
        loss_fn(z_s, z_t[:, :3], y)


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_is_minimal_and_stationary_when_student_equals_teacher(name, logits):
    """KD, DKD: exactly 0 at z_s = z_t; DIST: 0 up to its eps (pearson's +eps in the denominator). For every loss the
    match is a minimum: no gradient there, and nearby students score higher."""
    z_s, z_t, y = logits
    loss_fn = LOSSES.get(name)
    z = z_t.clone().requires_grad_(True)
    at = loss_fn(z, z_t, y)
    at.backward()
    assert abs(float(at)) < 1e-5, float(at)
    assert z.grad.abs().max() < 1e-5
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        assert loss_fn(z_t + 0.5 * torch.randn(z_t.shape, generator=g), z_t, y) > at


# --- DISTILLERS -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """A tiny CNN student and a token-model teacher (heterogeneous, as OFA-KD needs) on 1x64x64 inputs, 10 classes."""
    torch.manual_seed(0)
    student = ARCHS.get("ghostnetv3_050")(num_classes=10, in_chans=1)
    teacher = ARCHS.get("vit_pico")(num_classes=10, in_chans=1, img_size=64)
    return student, teacher, torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("name", DISTILLERS.names())
def test_distiller_trains_the_student_only(name, pair):
    student, teacher, x, y = pair
    cls = DISTILLERS.get(name)
    assert issubclass(cls, Distiller)
    recipe = name if name in RECIPES else "kd"
    cfg = dataclasses.replace(RECIPES.get(recipe), teacher="teacher.safetensors")
    takes_example = "example" in inspect.signature(cls.__init__).parameters    # OFA sizes its projectors on one
    d = cls(student, teacher, cfg, x) if takes_example else cls(student, teacher, cfg)
    d.train()
    assert not teacher.training, "the teacher stays in eval mode"
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    out, losses = d(x, x, y)
    assert out.shape == (4, 10) and "ce" in losses and len(losses) >= 2, sorted(losses)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    aux = d.aux()
    assert aux is None or isinstance(aux, nn.Module)


# --- PROJECTORS -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROJECTORS.names())
def test_projector_rule_is_complete_and_tried(name):
    from effai.train.projectors import family_of

    rule = PROJECTORS.get(name)
    assert callable(rule.matches) and callable(rule.build) and rule.layout.strip()
    with pytest.raises(UsageError) as e:       # no family takes a 2-D feature: the error lists every family
        family_of(nn.Identity(), torch.zeros(2, 8), "head")
    assert f"{name}: {rule.layout}" in str(e.value)


# --- RECIPES ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES.names())
def test_recipe_is_a_frozen_config_whose_defaults_validate(name):
    cfg = RECIPES.get(name)
    assert isinstance(cfg, TrainConfig) and cfg.recipe == name
    assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1  # type: ignore[misc]
    assert cfg.loss in LOSSES, f"default loss {cfg.loss} is not registered"
    try:
        made = make_config(name)
    except UsageError as e:        # the one default that cannot validate: a teacher has no default
        assert "--teacher" in str(e), str(e)
        made = make_config(name, teacher="teacher.safetensors")
    assert made.recipe == name and made.channels in (1, 3) and isinstance(made.hflip, bool)
    assert made.optimizer in ("sgd", "adamw")
    assert set(made.to_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert math.isfinite(made.lr) and made.lr > 0
    with pytest.raises(UsageError, match="unknown training options"):
        make_config(name, teacher="t.safetensors", no_such_option=1)


# --- METERS, RUNNERS --------------------------------------------------------------------------------------------------
class EmptyDevice:
    """A device that exposes nothing: no sysfs files, no commands."""

    def read_text(self, path: str) -> str | None:
        return None

    def listdir(self, path: str) -> list[str]:
        return []

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        return 127, f"{argv[0]}: not found"


@pytest.mark.parametrize("name", METERS.names())
def test_meter_says_why_it_cannot_measure_a_bare_device(name):
    meter = METERS.get(name)()
    assert meter.name == name and meter.kind in ("power", "energy") and name in AUTO_ORDER
    why = meter.probe(EmptyDevice())
    assert isinstance(why, str) and why.strip() and "\n" not in why


@pytest.mark.parametrize("name", RUNNERS.names())
def test_runner_kind_is_parsed_and_documented(name):
    assert name in FORMS
    assert parse_spec(f"{name}:arg")[0] == name and parse_spec(name) == (name, "")
    assert callable(RUNNERS.get(name))
    with pytest.raises(UsageError, match="unknown --device"):
        parse_spec(f"{name}x:arg")
