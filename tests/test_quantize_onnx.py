"""ONNX int8 (static QDQ) and int8-dynamic export through OnnxTarget.lower(), run in onnxruntime.

Two models: effai's trained GhostNetV3 on digits (a sane model with real calibration and held-out data, for
accuracy and float_layers) and a small wide conv net (enough weights for the size ratio; fast to export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from effai.errors import EffaiError, UsageError
from effai.export.layer_map import fingerprint
from effai.export.targets.base import TARGETS, LowerOptions
from effai.export.trace import trace

TARGET = TARGETS.get("onnx")
pytestmark = pytest.mark.skipif(not TARGET.available()[0], reason=TARGET.available()[1])


class Wide(nn.Module):
    """~630k parameters: conv weights dominate the file, as in real models."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.conv3 = nn.Conv2d(128, 256, 1)
        self.fc = nn.Linear(256, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = x + torch.relu(self.dw(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class Overflow(nn.Module):
    """Finite inputs, infinite activations: exp(100 x) overflows float32 for x > 0.89."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.exp(100 * x))


def lower(program, x: torch.Tensor, out: Path, **options):
    out.mkdir(parents=True, exist_ok=True)
    lowered = TARGET.lower(program, (x,), LowerOptions(**options), out)
    return lowered, TARGET.load(out, lowered)


def run_all(predictor, x: np.ndarray) -> np.ndarray:
    return np.concatenate([predictor.run([x[i:i + 1]])[0] for i in range(len(x))])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def float_weights(path: Path) -> list[np.ndarray]:
    import onnx
    from onnx import TensorProto, numpy_helper

    return [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2]


def has_float_copy(weight: torch.Tensor, path: Path) -> bool:
    """Is this torch weight stored in float in the ONNX file (any layout)?"""
    fp = fingerprint(weight.detach().numpy())
    return any(w.size == fp.size and np.allclose(fingerprint(w), fp, rtol=1e-5, atol=1e-7) for w in float_weights(path))


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(1, 3, 32, 32)
    program = trace(model, (x,))
    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    root = tmp_path_factory.mktemp("wide")
    fp32 = lower(program, x, root / "fp32")
    return {"model": model, "program": program, "x": x, "calib": calib, "root": root, "fp32": fp32}


@pytest.fixture(scope="module")
def wide_int8(wide):
    return lower(wide["program"], wide["x"], wide["root"] / "int8", precision="int8", calibration=wide["calib"])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Trained GhostNetV3 on digits, folded; calibration from the train split, checks on the held-out split; int8
    keeps `conv_head` (the largest conv) in float."""
    from effai import zoo
    from effai.export.evaluate import eval_set
    from effai.export.fold import fold
    from effai.data import datasets as data_mod

    loaded = zoo.create("ghostnetv3_050.digits")
    card, model = loaded.card, loaded.model.eval()
    c, h, _ = card.input_size
    split = card.extra["split"]
    train, _ = data_mod.split(data_mod.load("digits", h, c), split["val_fraction"], split["seed"])
    calib = ((train.x[::40].float() / 255 - card.mean[0]) / card.std[0]).numpy()   # 36 training images
    held_x, held_y, _ = eval_set("digits", card)
    held_x, held_y = held_x[:96], held_y[:96]
    x = torch.from_numpy(held_x[:1])
    fold(model, (torch.from_numpy(held_x[:4]),))
    program = trace(model, (x,))
    root = tmp_path_factory.mktemp("digits")
    fp32 = lower(program, x, root / "fp32")
    int8 = lower(program, x, root / "int8", precision="int8", calibration=calib, float_layers=("conv_head",))
    return {"model": model, "program": program, "calib": calib, "x": held_x, "y": held_y, "root": root,
            "fp32": fp32, "int8": int8}


# ---------------------------------------------------------------------------------------------------- int8

def test_onnx_lists_the_int8_precisions(wide):
    assert TARGET.precisions == ("fp32", "int8", "int8-dynamic")
    details = wide["fp32"][0].details
    assert details["precision"] == "fp32" and "quantization" not in details and "QuantizeLinear" not in details["ops"]


def test_int8_matches_fp32_on_held_out_digits(digits):
    (_, fp32), (_, int8) = digits["fp32"], digits["int8"]
    ref, out = run_all(fp32, digits["x"]), run_all(int8, digits["x"])
    assert cosine(out, ref).min() > 0.99
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert (out.argmax(1) == digits["y"]).mean() >= (ref.argmax(1) == digits["y"]).mean() - 0.03


def test_int8_graph_is_qdq_with_the_fp32_interface(digits):
    (fp32_lowered, _), (lowered, _) = digits["fp32"], digits["int8"]
    ops = lowered.details["ops"]
    assert ops["QuantizeLinear"] > 50 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert lowered.details["precision"] == "int8"
    def interface(low):
        return [(s.name, s.shape, s.dtype) for s in low.inputs + low.outputs]

    assert interface(lowered) == interface(fp32_lowered)
    q = lowered.details["quantization"]
    assert q["calibration_method"] == "MinMax" and q["calibration_samples"] == len(digits["calib"])
    assert "QDQ" in q["scheme"] and q["nodes_quantized"] > 100 and q["weights_int8"] > 100


def test_int8_keeps_float_layers_in_float(digits):
    lowered, _ = digits["int8"]
    q = lowered.details["quantization"]
    assert q["float_layers"] == ["conv_head"] and q["unmatched_float_layers"] == []
    assert len(q["excluded_nodes"]) == 1 and q["excluded_by_layer"] == {"conv_head": q["excluded_nodes"]}
    path = digits["root"] / "int8" / lowered.model_file
    assert has_float_copy(digits["model"].conv_head.weight, path)          # stays float
    assert not has_float_copy(digits["model"].conv_stem.weight, path)      # the others are int8
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    node = next(n for n in graph.node if n.name == q["excluded_nodes"][0])
    assert node.op_type == "Conv" and producers.get(node.input[1]) != "DequantizeLinear"


def test_int8_file_is_about_4x_smaller(wide, wide_int8):
    fp32_size = (wide["root"] / "fp32" / "model.onnx").stat().st_size
    int8_size = (wide["root"] / "int8" / "model.onnx").stat().st_size
    assert 3.5 < fp32_size / int8_size < 4.1, (fp32_size, int8_size)


def test_int8_close_to_fp32_on_calibration_like_inputs(wide, wide_int8):
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref, out = run_all(wide["fp32"][1], x), run_all(wide_int8[1], x)
    assert cosine(out, ref).min() > 0.99


def test_int8_without_calibration_is_a_usage_error(wide, tmp_path):
    with pytest.raises(UsageError, match="int8 needs calibration data"):
        TARGET.lower(wide["program"], (wide["x"],), LowerOptions(precision="int8"), tmp_path)


def test_int8_calibration_of_the_wrong_shape_is_a_usage_error(wide, tmp_path):
    with pytest.raises(UsageError, match=r"calibration data has shape \(4, 3, 16, 16\)"):
        TARGET.lower(wide["program"], (wide["x"],), LowerOptions(precision="int8", calibration=np.zeros(
            (4, 3, 16, 16), np.float32)), tmp_path)


def test_int8_nan_calibration_is_refused(wide, tmp_path):
    calib = wide["calib"].copy()
    calib[3, 0, 5, 5] = np.nan
    with pytest.raises(EffaiError, match=r"1 non-finite values \(NaN/inf\), first in sample 3"):
        TARGET.lower(wide["program"], (wide["x"],), LowerOptions(precision="int8", calibration=calib), tmp_path)


def test_int8_overflowing_activations_name_the_tensor(tmp_path):
    x = torch.rand(1, 3, 8, 8)
    program = trace(Overflow().eval(), (x,))
    calib = np.random.default_rng(0).uniform(0, 1, (4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(EffaiError, match=r"non-finite \(NaN/inf\) ranges for \d+ tensors: \S+ \["):
        TARGET.lower(program, (x,), LowerOptions(precision="int8", calibration=calib), tmp_path)


def test_unknown_float_layer_is_an_error(wide, tmp_path):
    with pytest.raises(UsageError, match="--float-layers: 'nope' is not a Conv/Linear layer of the model; "
                                         "choose one of: conv1, conv2, conv3, dw, fc"):
        TARGET.lower(wide["program"], (wide["x"],), LowerOptions(precision="int8", calibration=wide["calib"],
                                                                  float_layers=("nope",)), tmp_path)


def test_float_layer_folded_away_is_reported_unmatched(tmp_path):
    """conv1 + BN not folded by effai: the ONNX exporter fuses them, so conv1's own weight is not in the graph."""
    torch.manual_seed(0)
    model = Wide(bn=True).eval()
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 32, 32)
    calib = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    lowered, predictor = lower(trace(model, (x,)), x, tmp_path, precision="int8", calibration=calib,
                               float_layers=("conv1", "conv2"))
    q = lowered.details["quantization"]
    assert q["unmatched_float_layers"] == ["conv1"] and list(q["excluded_by_layer"]) == ["conv2"]
    assert "conv1" in lowered.details["warnings"][0]
    assert "BatchNormalization" not in lowered.details["ops"]
    assert np.isfinite(predictor.run([x.numpy()])[0]).all()


# ---------------------------------------------------------------------------------------------------- int8-dynamic

def test_int8_dynamic_quantizes_linear_layers_only(wide, tmp_path):
    lowered, predictor = lower(wide["program"], wide["x"], tmp_path, precision="int8-dynamic")
    ops = lowered.details["ops"]
    assert ops.get("MatMulInteger") == 1 and ops.get("DynamicQuantizeLinear") == 1
    assert ops.get("Conv") == 4 and "ConvInteger" not in ops and "QuantizeLinear" not in ops
    q = lowered.details["quantization"]
    assert q["calibration_method"] is None and q["nodes_quantized"] == 1 and q["weights_int8"] == 1
    assert not has_float_copy(wide["model"].fc.weight, tmp_path / "model.onnx")
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert cosine(run_all(predictor, x), run_all(wide["fp32"][1], x)).min() > 0.99


def test_int8_dynamic_keeps_float_layers_in_float(wide, tmp_path):
    lowered, predictor = lower(wide["program"], wide["x"], tmp_path, precision="int8-dynamic", float_layers=("fc",))
    q = lowered.details["quantization"]
    assert list(q["excluded_by_layer"]) == ["fc"] and q["nodes_quantized"] == 0
    assert "MatMulInteger" not in lowered.details["ops"]
    assert has_float_copy(wide["model"].fc.weight, tmp_path / "model.onnx")
    x = wide["x"].numpy()
    np.testing.assert_allclose(predictor.run([x])[0], wide["fp32"][1].run([x])[0], rtol=1e-4, atol=1e-5)
