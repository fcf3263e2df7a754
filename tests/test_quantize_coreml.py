"""Compressed Core ML exports: int8/int4 weights, palettes, W8A8 with Linux calibration, float_layers, size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("coremltools")

from effai.errors import EffaiError, UsageError  # noqa: E402
from effai.export.parity import TOLERANCES, compare  # noqa: E402
from effai.export.precisions import PRECISIONS  # noqa: E402
from effai.export.targets import TARGETS  # noqa: E402
from effai.export.targets import coreml  # noqa: E402
from effai.export import coreml_mil  # noqa: E402
from effai.export.targets.base import LowerOptions  # noqa: E402

SIZE = 32
COMPRESSED = ("int8", "int8-weight", "int4-weight", "palette4", "palette6", "palette8")
# weights above coremltools' 2048-element threshold: body.2 (18432), body.4 (73728), body.8 (32768); body.0 stays fp16
N_COMPRESSIBLE = 3
MIN_COSINE = {"int8": 0.999, "int8-weight": 0.999, "int4-weight": 0.99, "palette4": 0.99, "palette6": 0.999,
              "palette8": 0.999}
EXPECTED_OPS = {"int8": "constexpr_affine_dequantize", "int8-weight": "constexpr_affine_dequantize",
                "int4-weight": "constexpr_blockwise_shift_scale", "palette4": "constexpr_lut_to_dense",
                "palette6": "constexpr_lut_to_dense", "palette8": "constexpr_lut_to_dense"}


class Net(nn.Module):
    """conv/relu stack + linear with >= 32 channels, and a layer forward never uses (no const to match)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 256))
        self.unused = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def calib():
    return np.random.RandomState(0).randn(8, 3, SIZE, SIZE).astype(np.float32)


@pytest.fixture(scope="module")
def lowered(net, calib, tmp_path_factory):
    """{precision: (artifact dir, Lowered)} for fp32 and every compressed precision, lowered once."""
    out = {}
    x = torch.randn(1, 3, SIZE, SIZE)
    for precision in ("fp32", *COMPRESSED):
        d = tmp_path_factory.mktemp(precision)
        out[precision] = d, _lower(net, precision, d, calibration=calib, x=x)
    return out


def _lower(model, precision, out_dir, x=None, **kw):
    x = torch.randn(1, 3, SIZE, SIZE) if x is None else x
    return TARGETS.get("coreml").lower(model, (x,), LowerOptions(precision=precision, **kw), out_dir)


def _structural(d, low, precision, out=(1, 256)):
    expected = {"input_shapes": [(1, 3, SIZE, SIZE)], "output_shapes": [out], "precision": precision}
    return TARGETS.get("coreml").structural_check(d, low, expected)


def _simulated_vs_torch(model, d, n=4):
    xs = np.random.RandomState(1).randn(n, 3, SIZE, SIZE).astype(np.float32)
    got = np.concatenate([coreml_mil.simulate(d / "model.mlpackage", [x[None]])[0] for x in xs])
    with torch.no_grad():
        want = model(torch.from_numpy(xs)).numpy()
    return compare([want], [got], TOLERANCES["fp16"])


def test_coreml_lists_every_compressed_precision_fp16_first():
    t = TARGETS.get("coreml")
    assert t.precisions[0] == "fp16" and set(COMPRESSED) | {"fp32"} <= set(t.precisions)
    assert all(p in PRECISIONS for p in t.precisions)


@pytest.mark.parametrize("precision", COMPRESSED)
def test_compressed_package_passes_its_structural_check(lowered, precision):
    d, low = lowered[precision]
    s = _structural(d, low, precision)
    assert s["status"] == "pass", s["problems"]
    c = s["compressed_weights"]
    assert c["count"] == N_COMPRESSIBLE and c["ops"] == {EXPECTED_OPS[precision]: N_COMPRESSIBLE}
    assert set(s["weight_dtypes"]) == {"fp16"}   # what stays uncompressed (biases, the 864-weight stem) is fp16
    if precision.startswith("palette"):
        assert c["lut_entries"] == [2 ** int(precision[-1])]
    else:
        assert set(c["data_dtypes"]) == {"int4" if precision == "int4-weight" else "int8"}
    q = low.details["quantization"]
    assert q["layers_quantized"] == N_COMPRESSIBLE and q["float_layers"] == [] and q["unmatched_float_layers"] == []
    assert q["minimum_deployment_target"] == low.details["minimum_deployment_target"] == \
        coreml.MIN_TARGETS.get(precision, coreml.MIN_TARGET)
    assert low.details["compute_precision"] == "fp16"


@pytest.mark.parametrize("precision", COMPRESSED)
def test_weight_blob_shrinks_by_the_bit_width(lowered, precision):
    fp32 = lowered["fp32"][1].details["spec"]["weights_bytes"]
    got = lowered[precision][1].details["spec"]["weights_bytes"]
    blob = lowered[precision][0] / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert blob.stat().st_size == got
    expected = PRECISIONS.get(precision).weight_bits / 32   # measured: 0.257 int8, 0.136 int4, 0.131/0.193/0.257 LUT
    assert expected * 0.85 < got / fp32 < expected * 1.15, (got, fp32)


@pytest.mark.parametrize("precision", COMPRESSED)
def test_compressed_numerics_stay_close_to_torch(net, lowered, precision):
    """Decompressed weights (and W8A8's quantize/dequantize) evaluated on Linux against the torch model."""
    r = _simulated_vs_torch(net, lowered[precision][0])
    assert r["cosine"] >= MIN_COSINE[precision], r


def test_w8a8_inserts_activation_quantization_calibrated_on_linux(lowered):
    d, low = lowered["int8"]
    s = _structural(d, low, "int8")
    assert s["ops"]["quantize"] == s["ops"]["dequantize"] == low.details["quantization"]["activations_quantized"] > 0
    cal = low.details["quantization"]["calibration"]
    assert cal["samples"] == 8 and "evaluator" in cal["method"]
    assert cal["evaluator_vs_torch"]["cosine"] > 0.9999   # the evaluator reproduces the fp16 program


def test_structural_check_fails_a_float_package_claimed_as_compressed(lowered):
    d, low = lowered["fp32"]
    for precision in COMPRESSED:
        s = _structural(d, low, precision)
        assert s["status"] == "fail" and s["problems"], precision


def test_float_layers_keep_their_weight_uncompressed(net, tmp_path):
    low = _lower(net, "int8-weight", tmp_path, float_layers=("body.4", "unused"))
    q = low.details["quantization"]
    assert q["float_layers"] == ["body.4", "unused"] and q["unmatched_float_layers"] == ["unused"]
    assert q["layers_quantized"] == N_COMPRESSIBLE - 1
    (const,) = q["float_layer_weights"]["body.4"]
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    meta = cto.get_weights_metadata(ct.models.MLModel(str(tmp_path / "model.mlpackage"), skip_model_load=True))
    kept = meta[const].val
    assert kept.dtype == np.float16
    np.testing.assert_allclose(kept.astype(np.float32), net.body[4].weight.detach().numpy(), rtol=1e-3, atol=1e-6)
    assert _structural(tmp_path, low, "int8-weight")["status"] == "pass"


def test_float_layers_skip_activation_quantization_too(net, calib, lowered, tmp_path):
    low = _lower(net, "int8", tmp_path, calibration=calib, float_layers=("body.4",))
    q, full = low.details["quantization"], lowered["int8"][1].details["quantization"]
    assert q["layers_quantized"] == N_COMPRESSIBLE - 1
    assert q["activations_quantized"] < full["activations_quantized"]
    assert _structural(tmp_path, low, "int8")["status"] == "pass"


def test_int8_without_calibration_is_a_usage_error(net, tmp_path):
    with pytest.raises(UsageError, match="calibration"):
        _lower(net, "int8", tmp_path)
    with pytest.raises(UsageError, match="shape"):
        _lower(net, "int8", tmp_path, calibration=np.zeros((4, 3, 16, 16), np.float32))


def test_unlisted_precision_is_a_usage_error(net, tmp_path):
    """One decision (effai.export.plan) refuses it for every entry point, before anything is lowered."""
    from effai.export.pipeline import ExportConfig, resolve
    from effai.export.plan import plan
    from effai.zoo import LoadedModel, RANDOM_INIT
    from effai.zoo.card import ModelCard

    p = plan("coreml", "int8-dynamic")
    assert not p.ok and "int8-dynamic" in p.reason and "coreml takes:" in p.reason
    loaded = LoadedModel(net, ModelCard(name="net", family="t", source="module:net", input_size=(3, SIZE, SIZE)),
                         RANDOM_INIT)
    with pytest.raises(UsageError, match="int8-dynamic"):
        resolve(loaded, ExportConfig(target="coreml", precision="int8-dynamic", out=tmp_path / "x"))


class Mixed(nn.Module):
    """The ops of compact vision nets: padded pools, hard-swish/SE gating, concat, residual add, upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.dw = nn.Conv2d(32, 32, 5, padding=2, groups=32)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                                nn.Hardsigmoid())
        self.pw = nn.Conv2d(64, 64, 1)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.stem(x))
        x = self.pool(x)
        y = self.dw(x) * self.se(x)
        x = self.pw(torch.cat([x + y, self.avg(x)], 1))
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest") + nn.functional.gelu(
            nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return torch.softmax(self.head(self.norm(x.mean((2, 3)))), -1)


def test_linear_calibration_evaluates_the_ops_of_compact_nets(tmp_path):
    """The evaluator checks itself against torch; it would raise "needs macOS" on any mismatch."""
    torch.manual_seed(0)
    model = Mixed().eval()
    cal = np.random.RandomState(0).randn(4, 3, SIZE, SIZE).astype(np.float32)
    low = _lower(model, "int8", tmp_path, calibration=cal)
    assert low.details["quantization"]["calibration"]["evaluator_vs_torch"]["cosine"] > 0.9999
    assert _structural(tmp_path, low, "int8", out=(1, 10))["status"] == "pass"
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    _lower(model, "fp16", fp16)
    assert _simulated_vs_torch(model, fp16)["status"] == "pass"


class Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).cumsum(3)


def test_w8a8_on_linux_names_macos_when_the_evaluator_lacks_an_op(tmp_path, monkeypatch):
    monkeypatch.setattr(coreml.platform, "system", lambda: "Linux")
    cal = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(EffaiError, match=r"needs macOS.*cumsum"):
        _lower(Cumsum().eval(), "int8", tmp_path, calibration=cal)


class Op(nn.Module):
    def __init__(self, fn, *modules: nn.Module) -> None:
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.mods)


F = nn.functional
OPS = {
    "max_pool_pad": lambda x: F.max_pool2d(x, 3, 2, 1),
    "max_pool_ceil": lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True),
    "avg_pool_include_pad": lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=True),
    "avg_pool_exclude_pad": lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    "avg_pool_ceil": lambda x: F.avg_pool2d(x, 2, 2, ceil_mode=True),
    "conv_same_dilated": (lambda x, c: c(x), nn.Conv2d(8, 8, 3, padding="same", dilation=2)),
    "conv_stride_groups": (lambda x, c: c(x), nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)),
    "hardswish_hardsigmoid": lambda x: F.hardswish(x) + F.hardsigmoid(x),
    "gelu_exact_tanh": lambda x: F.gelu(x) + F.gelu(x, approximate="tanh"),
    "silu_relu6_leaky_elu": lambda x: F.silu(x) + F.relu6(3 * x) + F.leaky_relu(x, 0.1) + F.elu(x),
    "prelu": (lambda x, p: p(x), nn.PReLU(8, 0.2)),
    "clamp_sigmoid_tanh": lambda x: x.clamp(-0.5, 0.7) + torch.sigmoid(x) * torch.tanh(x),
    "upsample_nearest": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "upsample_bilinear_align": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
    "upsample_bilinear_half_pixel": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "layer_norm_last": (lambda x, n: n(x), nn.LayerNorm(12)),
    "layer_norm_channels": lambda x: F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2),
    "group_norm": (lambda x, n: n(x), nn.GroupNorm(2, 8)),
    "instance_norm": (lambda x, n: n(x), nn.InstanceNorm2d(8, affine=True)),
    "softmax_mean_max": lambda x: torch.softmax(x, 1) + x.mean((2, 3), keepdim=True) + x.amax(3, keepdim=True),
    "concat_split_slice": lambda x: torch.cat([*x.chunk(2, 1)[::-1], x[:, 1:7:2]], 1)[..., 2:-1],
    "reshape_transpose_matmul": lambda x: (x.flatten(2).transpose(1, 2) @ x.flatten(2)).reshape(1, 1, 144, 144),
    "pad_reflect_constant": lambda x: F.pad(F.pad(x, (1, 2, 0, 1), mode="reflect"), (1, 1, 1, 1), value=0.5),
    "pixel_shuffle": lambda x: F.pixel_shuffle(x, 2),
    "div_pow_sqrt_rsqrt": lambda x: x / (x.abs() + 1) + (x.abs() + 0.1) ** 1.5 + (x * x + 1).rsqrt() + x.abs().sqrt(),
}


@pytest.mark.parametrize("name", OPS)
def test_evaluator_computes_each_op_as_torch_does(name, tmp_path):
    """fp32 programs of single torch ops: simulate() (decompress + evaluator) matches torch to float32 roundoff."""
    fn, *mods = OPS[name] if isinstance(OPS[name], tuple) else (lambda x, f=OPS[name]: f(x),)
    torch.manual_seed(0)
    model = Op(fn, *mods).eval()
    x = torch.randn(1, 8, 12, 12)
    _lower(model, "fp32", tmp_path, x=x)
    got = coreml_mil.simulate(tmp_path / "model.mlpackage", [x.numpy()])[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
