"""int8 on the digits model on every target: the accuracy gate, the size, the delegation and the metadata (the
quantization issue's done-when numbers; one int8 export per target, shared by this file's tests)."""

from __future__ import annotations

import pytest

from effai import zoo
from effai.errors import EffaiError
from effai.export.pipeline import ExportConfig, export

DIGITS = "ghostnetv3_050.digits"


@pytest.fixture(scope="module")
def digits():
    return zoo.create(DIGITS)


# --- int8 on the digits model, every target (slow: one export per target) --------------------------------------


@pytest.fixture(scope="module")
def digits_int8(digits, digits_exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for target in ("executorch", "tflite", "onnx", "coreml"):
        fp = digits_exports[target]          # the float artifact, shared with the export matrix's accuracy check
        try:
            q = export(digits, ExportConfig(target=target, precision="int8", out=root / target))
        except EffaiError as e:  # recorded, asserted per target below
            q = e
        out[target] = (fp, q)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", ["executorch", "tflite", "onnx"])
def test_digits_int8_loses_at_most_one_point_and_is_much_smaller(digits_int8, target):
    fp, q = digits_int8[target]
    assert not isinstance(q, Exception), q
    a = q.manifest["accuracy"]
    assert a["status"] == "pass" and a["drop_points"] <= 1.0 and a["artifact"]["top1"] > 0.97, a
    size = [sum(f["bytes"] for f in r.manifest["files"] if f["path"].startswith(r.manifest["model_file"]))
            for r in (fp, q)]
    # weights alone shrink ~4x; narrow layers' per-channel scales, int32 biases, Q/DQ nodes and (TFLite) tensor
    # names are a larger share of a small model's file: measured 2.7-3.1x here
    assert size[0] / size[1] > 2.5, (target, size)
    qm = q.manifest["quantization"]
    assert qm["calibration"]["source"].startswith("digits training split") and qm["precision"] == "int8"


@pytest.mark.slow
def test_digits_int8_executorch_is_one_partition_with_nothing_outside(digits_int8):
    _, q = digits_int8["executorch"]
    d = q.manifest["target_details"]["delegation"]
    assert d["partitions"] == 1 and set(d["non_delegated_ops"]) <= {"getitem"}, d
    assert d["delegated_ops"].get("quantized_decomposed_quantize_per_tensor_default", 0) > 0


@pytest.mark.slow
def test_digits_int8_coreml_is_w8a8_checked_structurally(digits_int8):
    _, q = digits_int8["coreml"]
    if isinstance(q, EffaiError):
        pytest.fail(str(q))
    assert q.manifest["parity"]["structural"]["status"] == "pass"


@pytest.mark.slow
def test_digits_int8_tflite_keeps_its_metadata_and_labels(digits_int8):
    """ai-edge-quantizer writes its buffers after the flatbuffer; effai inlines them (under 2 GB) instead of skipping
    the metadata with a false "over 2 GB" reason: labels and normalization ride in the int8 file, outputs unchanged."""
    import zipfile

    _, q = digits_int8["tflite"]
    native = q.manifest["native_metadata"]
    assert "skipped" not in native and native["outputs_unchanged"] is True and native["labels"] != "none", native
    with zipfile.ZipFile(q.out_dir / q.manifest["model_file"]) as z:
        assert z.read("labels.txt").decode().split() == [str(i) for i in range(10)]
    assert not any("not embedded" in w for w in q.manifest["warnings"])
