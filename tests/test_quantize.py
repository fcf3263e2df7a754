"""effai export --quantize: precision validation, calibration data, sensitivity, the accuracy gate and fallback on a
tiny model, float layers per target. The digits model's int8 on every target: test_quantize_digits.py; the fallback
and int8-dynamic on the real model: test_quantize_fallback.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from effai import zoo
from effai.errors import EffaiError, UsageError
from effai.export import calibration
from effai.export.pipeline import ExportConfig, ParityFailed, export
from effai.export.precisions import PRECISIONS
from effai.export.sensitivity import fallback_schedule, fake_quant_weight, layer_sensitivity
from effai.export.targets import TARGETS
from tests.helpers import run_cli

DIGITS = "ghostnetv3_050.digits"


@pytest.fixture(scope="module")
def digits():
    return zoo.create(DIGITS)


# --- precisions -------------------------------------------------------------------------------------------------


def test_every_target_lists_only_known_precisions_default_first():
    for name, t in TARGETS.items():
        assert set(t.precisions) <= set(PRECISIONS.names()), name
        assert t.precisions[0] in ("fp32", "fp16")
        assert "int8" in t.precisions, f"{name} must offer static int8"


@pytest.mark.parametrize("args, message", [
    (["--target", "executorch", "--quantize", "palette4"], "executorch takes: fp32, int8, int8-dynamic, int8-weight"),
    (["--target", "onnx", "--quantize", "palette4"], "onnx takes: fp32, int8, int8-dynamic"),
    (["--target", "all", "--quantize", "palette4"], "not supported by executorch"),
    (["--target", "onnx", "--quantize", "int9"], "unknown --quantize 'int9'"),
])
def test_unsupported_precision_is_refused_before_loading_the_model(args, message, tmp_path):
    code, js, _, err = run_cli("export", "no_such_model_to_load", *args, "--out", str(tmp_path / "o"), "--json")
    assert code == 2 and message in js["error"], js
    assert not (tmp_path / "o").exists()


def test_io_dtype_int8_only_for_tflite_int8(digits, tmp_path):
    with pytest.raises(UsageError, match="--io-dtype int8 applies to --target tflite --quantize int8 only"):
        export(digits, ExportConfig(target="onnx", precision="int8", io_dtype="int8", out=tmp_path / "x"))
    with pytest.raises(UsageError, match="--float-layers needs a quantized precision"):
        export(digits, ExportConfig(target="onnx", float_layers=("conv_stem",), out=tmp_path / "y"))


# --- calibration data -------------------------------------------------------------------------------------------


def test_calibration_photos_are_seeded_crops_preprocessed_per_card(digits):
    card = zoo.create("ghostnetv3_050").card.with_(input_size=(3, 64, 64))
    a = calibration.load("photos", card.preprocessing(), card, 40, seed=0)
    b = calibration.load("photos", card.preprocessing(), card, 40, seed=0)
    assert a.x.shape == (40, 3, 64, 64) and a.x.dtype == np.float32 and a.sha256 == b.sha256
    assert len({a.x[i].tobytes() for i in range(40)}) == 40          # no duplicate samples
    assert -3 < a.x.mean() < 3 and not a.warnings


def test_calibration_digits_never_uses_the_held_out_images(digits):
    from effai.export.evaluate import eval_set

    c = calibration.load("auto", digits.card.preprocessing(), digits.card, 2000)
    held_out, _, _ = eval_set("digits", digits.card)
    assert "training split" in c.source and c.x.shape[0] == 1797 - held_out.shape[0]
    seen = {x.tobytes() for x in c.x}
    # digits has a few duplicate images across classes/splits; the split itself must be disjoint by index
    assert sum(x.tobytes() in seen for x in held_out) < 0.05 * held_out.shape[0]


def test_calibration_folder_errors_and_warnings(digits, tmp_path):
    from PIL import Image

    pre, card = digits.card.preprocessing(), digits.card
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        calibration.load(str(tmp_path / "empty"), pre, card, 10)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="cannot read image"):
        calibration.load(str(bad), pre, card, 10)
    good = tmp_path / "good" / "sub"
    good.mkdir(parents=True)
    for i in range(5):  # RGBA, large, non-square: converted, resized, cropped to the card's 1x64x64
        Image.fromarray(np.full((90, 120, 4), 40 * i, np.uint8), "RGBA").save(good / f"{i}.png")
    c = calibration.load(str(tmp_path / "good"), pre, card, 10)
    assert c.x.shape == (5, 1, 64, 64) and "only 5 calibration samples" in c.warnings[0]
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(UsageError, match=r"the model needs uint8 N x 64 x 64 x 3"):
        calibration.load(str(tmp_path / "wrong.npz"), pre, card, 10)
    with pytest.raises(UsageError, match="no such file or directory"):
        calibration.load(str(tmp_path / "nope"), pre, card, 10)


def test_calibration_that_produces_nan_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(EffaiError, match="NaN/inf activations at layer '2'"):
        calibration.check_finite(model, np.ones((2, 3, 8, 8), np.float32))


# --- sensitivity --------------------------------------------------------------------------------------------------


def test_fake_quant_weight_is_per_channel_symmetric():
    w = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -50.0]])
    q = fake_quant_weight(w, 8)
    assert torch.allclose(q[0], w[0], atol=1 / 127 / 2 + 1e-7) and torch.allclose(q[1], w[1], atol=100 / 127 / 2)


def test_sensitivity_ranks_a_planted_outlier_layer_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():  # a huge weight on a dead input channel: harmless in float, but per-channel int4 then
        model[0].weight[0] = 0.0   # rounds every other weight of layer 2 to zero
        model[0].bias[0] = -1.0
        model[2].weight[:, 0, 0, 0] = 200.0
    ranking = layer_sensitivity(model, np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32),
                                "int4-weight")
    assert ranking[0][0] == "2" and ranking[0][1] > 10 * ranking[1][1], ranking
    assert {n for n, _ in ranking} == {"0", "2", "4", "7"}


@pytest.mark.parametrize("name", TARGETS.names())
def test_every_target_declares_what_it_refuses_and_which_layers_it_quantizes(name):
    t = TARGETS.get(name)
    assert not set(t.unsupported) & set(t.precisions) and set(t.unsupported) <= set(PRECISIONS.names())
    assert set(t.quantizes) <= {p for p in t.precisions if PRECISIONS.get(p).quantized}


def test_sensitivity_ranks_only_the_layers_the_backend_quantizes():
    from effai.export.sensitivity import quantizable_layers

    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3, groups=64), nn.Conv2d(64, 64, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    from effai.export.targets.base import ALL_LAYERS

    rule = lambda target, precision: TARGETS.get(target).quantizes.get(precision, ALL_LAYERS)  # noqa: E731
    assert quantizable_layers(model) == ["0", "1", "2", "5"]
    assert quantizable_layers(model, rule("tflite", "int4-weight")) == ["0", "2", "5"]   # no DEPTHWISE_CONV_2D kernel
    assert quantizable_layers(model, rule("executorch", "int8-dynamic")) == ["5"]
    assert quantizable_layers(model, rule("onnx", "int8-dynamic")) == ["5"]
    # coremltools leaves weights of <= 2048 elements uncompressed: only the 64x64 1x1 conv (4096) is compressed
    assert quantizable_layers(model, rule("coreml", "int8-weight")) == quantizable_layers(model, rule("coreml",
                                                                                             "palette4")) == ["2"]
    assert quantizable_layers(model, rule("coreml", "int8")) == ["0", "1", "2", "5"]   # W8A8: every activation
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    assert {n for n, _ in layer_sensitivity(model.eval(), x, "int4-weight", rule("tflite", "int4-weight"))} == {
        "0", "2", "5"}


def test_float_layers_are_checked_against_the_model_and_the_backend(tmp_path):
    f = tmp_path / "tiny.py"
    f.write_text(TINY)
    loaded = zoo.create(model_def=f"{f}:Tiny")
    with pytest.raises(UsageError, match="no Conv2d/Linear layer 'bb'; did you mean 'b'"):
        export(loaded, ExportConfig(target="onnx", precision="int8-dynamic", float_layers=("bb",), out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    res = export(loaded, ExportConfig(target="onnx", precision="int8-dynamic", float_layers=("b",), fallback=False,
                                      out=tmp_path / "o"))
    assert any("does not quantize this layer anyway" in w for w in res.manifest["warnings"]), res.manifest["warnings"]
    # the onnx dynamic scheme takes the Linear only: the export says how little of this CNN it quantized
    assert any(w.startswith("int8-dynamic quantized 1 of ") and "-q int8" in w for w in res.manifest["warnings"])


def test_fallback_schedule_doubles_up_to_half_the_layers():
    assert fallback_schedule(1) == [1] and fallback_schedule(10) == [1, 2, 4] and fallback_schedule(64)[-1] == 32


# --- the gate and the fallback, end to end (a tiny user model: fast) --------------------------------------------

TINY = ("import torch\nINPUT_SHAPE = (1, 16, 16)\nMEAN = (0.5,)\nSTD = (0.5,)\nLABELS = [str(i) for i in range(10)]\n"
        "class Tiny(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.a = torch.nn.Conv2d(1, 16, 3, padding=1)\n        self.b = torch.nn.Conv2d(16, 32, 3, stride=2)\n"
        "        self.c = torch.nn.Conv2d(32, 32, 3)\n        self.fc = torch.nn.Linear(32, 10)\n"
        "    def forward(self, x):\n        x = torch.relu(self.a(x))\n        x = torch.relu(self.b(x))\n"
        "        x = torch.relu(self.c(x))\n        return self.fc(x.mean((2, 3)))\n")


def test_failed_gate_tries_float_layers_then_fails_with_every_attempt_recorded(tmp_path):
    f = tmp_path / "tiny.py"
    f.write_text(TINY)
    loaded = zoo.create(model_def=f"{f}:Tiny")
    cfg = ExportConfig(target="onnx", precision="int8", eval="digits", max_drop=-50.0, calib="digits",
                       calib_samples=64, out=tmp_path / "o")
    with pytest.raises(ParityFailed, match="accuracy gate"):
        export(loaded, cfg)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    q = m["quantization"]
    fb = q["fallback"]
    assert fb["status"] == "fail" and [a["float_layers"] for a in fb["attempts"]] == [1, 2]
    assert {s["layer"] for s in fb["sensitivity_top"]} == {"a", "b", "c", "fc"}
    assert q["calibration"]["samples"] == 64 and len(q["calibration"]["sha256"]) == 64
    assert m["accuracy"]["status"] == "fail" and m["status"] == "fail"


def test_gate_passes_without_fallback_and_records_calibration(tmp_path):
    f = tmp_path / "tiny.py"
    f.write_text(TINY)
    loaded = zoo.create(model_def=f"{f}:Tiny")
    res = export(loaded, ExportConfig(target="onnx", precision="int8", eval="digits", max_drop=100.0,
                                      calib="digits", calib_samples=16, out=tmp_path / "o"))
    q = res.manifest["quantization"]
    assert q["fallback"] is None and q["calibration"]["samples"] == 16
    assert any("only 16 calibration samples" in w for w in res.manifest["warnings"])


# --- float layers per target (the fallback's mechanism), on the tiny model -------------------------------------


@pytest.fixture(scope="module")
def tiny_folded(tmp_path_factory):
    from effai.export.fold import fold

    f = tmp_path_factory.mktemp("tiny") / "tiny.py"
    f.write_text(TINY)
    model = zoo.create(model_def=f"{f}:Tiny").model.eval()
    x = np.random.default_rng(0).standard_normal((32, 1, 16, 16)).astype(np.float32)
    fold(model, (torch.from_numpy(x[:4]),))
    return model, x


def test_executorch_float_layers_stay_unquantized(tiny_folded, tmp_path):
    from effai.export.targets.base import LowerOptions
    from effai.export.trace import trace

    model, x = tiny_folded
    t = TARGETS.get("executorch")
    ex = (torch.from_numpy(x[:1]),)
    for d in "abc":
        (tmp_path / d).mkdir()
    full = t.lower(trace(model, ex), ex, LowerOptions(precision="int8", calibration=x), tmp_path / "a")
    kept = t.lower(trace(model, ex), ex, LowerOptions(precision="int8", calibration=x, float_layers=("b",)),
                   tmp_path / "b")
    assert full.details["quantization"]["layers_quantized"] == 4
    assert kept.details["quantization"]["layers_quantized"] == 3 and kept.details["quantization"]["float_layers"] == ["b"]
    # Tiny ends in x.mean((2, 3)) without keepdim, which XNNPACK takes only as keepdim + view: effai rewrites it,
    # so the int8 graph is one partition with nothing outside
    d = full.details["delegation"]
    assert d["partitions"] == 1 and set(d["non_delegated_ops"]) <= {"getitem"}, d
    assert not full.details["warnings"], full.details["warnings"]
    with pytest.raises(EffaiError, match="not modules of the exported model"):
        t.lower(trace(model, ex), ex, LowerOptions(precision="int8", calibration=x, float_layers=("nope",)),
                tmp_path / "c")


def test_tflite_float_layers_and_int8_io(tiny_folded, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from effai.export.targets.base import LowerOptions

    model, x = tiny_folded
    t = TARGETS.get("tflite")
    ex = (torch.from_numpy(x[:1]),)
    lw = t.lower(model, ex, LowerOptions(precision="int8", calibration=x, float_layers=("b",), io_dtype="int8"),
                 tmp_path)
    q = lw.details["quantization"]
    assert q["float_tensors"] and not q["unmatched_float_layers"] and q["io_dtype"] == "int8"
    assert lw.inputs[0].dtype == "int8" and lw.inputs[0].quantization is not None
    interp = Interpreter(model_path=str(tmp_path / "model.tflite"))
    dtypes = {d["name"]: np.dtype(d["dtype"]).name for d in interp.get_tensor_details()}
    assert all(dtypes[n] == "float32" for n in q["float_tensors"]), {n: dtypes[n] for n in q["float_tensors"]}
    with torch.no_grad():
        ref = model(ex[0]).numpy()
    got = t.load(tmp_path, lw).run([x[:1]])[0]   # the predictor quantizes the float input with the tensor's scale
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95


def test_executorch_int8_dynamic_lowers_into_xnnpack(tiny_folded, tmp_path):
    from effai.export.targets.base import LowerOptions
    from effai.export.trace import trace

    model, x = tiny_folded
    t = TARGETS.get("executorch")
    ex = (torch.from_numpy(x[:1]),)
    lw = t.lower(trace(model, ex), ex, LowerOptions(precision="int8-dynamic"), tmp_path)
    assert lw.details["quantization"]["layers_quantized"] >= 1 and lw.details["quantization"]["calibration_samples"] == 0
    with torch.no_grad():
        ref = model(ex[0]).numpy()
    got = t.load(tmp_path, lw).run([x[:1]])[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95


class _Mlp(torch.nn.Module):
    """Linear-dominated, like a ViT's blocks (weight-only's use case), with a bias-free layer and a tiny conv stem."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = torch.nn.Linear(4 * 16 * 16, 256), torch.nn.Linear(256, 256, bias=False)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(torch.relu(self.stem(x)).flatten(1)))
        return self.head(torch.nn.functional.gelu(self.fc2(h)))


@pytest.mark.parametrize("precision,smaller", [("int8-weight", 3.5), ("int4-weight", 6.0)])
def test_executorch_weight_only_runs_in_xnnpack_and_matches_its_simulation(tmp_path, precision, smaller):
    """Weight-only linears in XNNPACK's f32-qc8w/qc4w kernels: one partition, nothing outside, the runtime equal to
    the PT2E simulation of the same quantized weights (biases split out: the kernels would drop them), the file
    3.5x / 6x smaller than fp32; a layer named in float_layers stays float; a CNN is warned about."""
    from effai.export.targets.base import LowerOptions
    from effai.export.executorch_weight_only import quantize_weight_only
    from effai.export.trace import trace

    model, t = _Mlp().eval(), TARGETS.get("executorch")
    ex = (torch.randn(2, 1, 16, 16),)
    for d in ("fp32", "q", "keep"):
        (tmp_path / d).mkdir()
    fp = t.lower(trace(model, ex), ex, LowerOptions(precision="fp32"), tmp_path / "fp32")
    lw = t.lower(trace(model, ex), ex, LowerOptions(precision=precision), tmp_path / "q")
    q, d = lw.details["quantization"], lw.details["delegation"]
    assert q["layers_quantized"] == 3 and q["biases_split"] == 2 and q["weights_covered"] > 0.99
    assert d["partitions"] == 1 and set(d["non_delegated_ops"]) <= {"getitem"}, d
    assert not lw.details["warnings"], lw.details["warnings"]
    size = lambda p: (p / "model.pte").stat().st_size      # noqa: E731
    assert size(tmp_path / "fp32") / size(tmp_path / "q") > smaller, (size(tmp_path / "fp32"), size(tmp_path / "q"))
    sim, _ = quantize_weight_only(trace(model, ex), ex, precision)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want, exact = sim.module()(x).numpy(), model(x).numpy()
    got = t.load(tmp_path / "q", lw).run([x.numpy()])[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(got - exact).max() > 1e-6            # really quantized, not the float model
    kept = t.lower(trace(model, ex), ex, LowerOptions(precision=precision, float_layers=("fc1",)), tmp_path / "keep")
    assert kept.details["quantization"]["layers_quantized"] == 2
    assert kept.details["quantization"]["float_layers"] == ["fc1"] and fp.details["delegation"]["partitions"] == 1


class _SharedAndComputed(torch.nn.Module):
    """One stored linear used twice, and a linear whose weight is computed in the graph (nothing to quantize)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc(torch.relu(self.fc(x.flatten(1))))
        return torch.nn.functional.linear(h, h.T @ h / 64)


def test_executorch_weight_only_counts_a_shared_weight_once_and_skips_computed_weights(tmp_path):
    from effai.export.targets.base import LowerOptions
    from effai.export.trace import trace

    model, ex = _SharedAndComputed().eval(), (torch.randn(2, 1, 8, 8),)
    t = TARGETS.get("executorch")
    lw = t.lower(trace(model, ex), ex, LowerOptions(precision="int8-weight"), tmp_path)
    q = lw.details["quantization"]
    assert q["layers_quantized"] == 1 and q["weights_covered"] == 1.0, q
    with torch.no_grad():
        ref = model(ex[0]).numpy()
    got = t.load(tmp_path, lw).run([ex[0].numpy()])[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_executorch_weight_only_on_a_cnn_warns_that_it_covers_little(tiny_folded, tmp_path):
    from effai.export.targets.base import LowerOptions
    from effai.export.trace import trace

    model, x = tiny_folded
    ex = (torch.from_numpy(x[:1]),)
    lw = TARGETS.get("executorch").lower(trace(model, ex), ex, LowerOptions(precision="int8-weight"), tmp_path)
    assert lw.details["quantization"]["layers_quantized"] == 1
    assert any("covers only" in w and "use int8" in w for w in lw.details["warnings"]), lw.details["warnings"]


def test_onnx_keeps_the_resize_other_targets_get_selection_maps():
    from effai.export.fold import fold

    # at 64x64 every DFC gate upsamples by an integer factor, which TFLite lowers right; at 224 four are 3x3 -> 7x7
    for target, size, rewrites in (("onnx", 224, 0), ("tflite", 64, 0), ("tflite", 224, 4), ("executorch", 64, 14),
                                   ("coreml", 64, 14), (None, 64, 14)):
        m = zoo.create("ghostnetv3_050").model
        report = fold(m, (torch.randn(1, 3, size, size),), target=target)
        assert sum(report.rewritten.values()) == rewrites, (target, size, report.rewritten)


def test_executorch_gets_timm_attention_without_fused_sdpa_other_targets_keep_it():
    """For ExecuTorch, timm's fused SDPA becomes its explicit softmax path (XNNPACK takes its matmuls and softmax,
    not SDPA's mask decomposition); fold() has checked the outputs are unchanged."""
    from effai.export.fold import fold

    card = zoo.resolve_card("vit_pico").with_(input_size=(1, 16, 16), num_classes=4, label_set=None,
                                              extra={"arch_kwargs": {"patch_size": 4}})
    for target, expected in (("executorch", 6), ("onnx", 0), ("tflite", 0)):
        m = zoo.build(card).eval()
        report = fold(m, (torch.randn(2, 1, 16, 16),), target=target)
        assert sum(report.rewritten.values()) == expected, (target, report.rewritten)
        assert all(b.attn.fused_attn is (expected == 0) for b in m.blocks)

    class Attention(torch.nn.Module):          # a user's class of the same name is not timm's: left alone
        def __init__(self):
            super().__init__()
            self.qkv, self.fused_attn = torch.nn.Linear(4, 12), True

        def forward(self, x):
            return self.qkv(x)

    user = Attention().eval()
    assert not fold(user, (torch.randn(2, 4),), target="executorch").rewritten and user.fused_attn is True
