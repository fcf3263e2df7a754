"""Native metadata inside exported artifacts, read back with each format's own tooling (coremltools spec, the TFLite
Metadata schema reader + zipfile, onnx + onnxruntime), with outputs bit-identical and bytes deterministic."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from effai import zoo
from effai.export import metadata
from effai.export.pipeline import ExportConfig, export
from effai.export.targets import TARGETS, LowerOptions
from effai.export.verify import parity_samples, verify
from tests.helpers import SMALL


def _read_tflite(path: Path):
    """(ModelMetadata of the TFLITE_METADATA buffer, the zip appended to the file), with the TFLite schema's and the
    TFLite Metadata schema's generated readers only."""
    from ai_edge_litert import schema_py_generated as tfl

    from effai.export._vendor import tflite_metadata_schema as md

    buf = path.read_bytes()
    model = tfl.Model.GetRootAs(buf, 0)
    entries = {model.Metadata(i).Name().decode(): model.Metadata(i).Buffer() for i in range(model.MetadataLength())}
    data = model.Buffers(entries["TFLITE_METADATA"]).DataAsNumpy().tobytes()
    assert md.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0)
    return md.ModelMetadata.GetRootAs(data, 0), zipfile.ZipFile(path)


def _input_units(meta):
    """(ImageProperties, NormalizationOptions, Stats) of the first input tensor's metadata."""
    from effai.export._vendor import tflite_metadata_schema as md

    t = meta.SubgraphMetadata(0).InputTensorMetadata(0)
    assert t.Content().ContentPropertiesType() == md.ContentProperties.ImageProperties
    image = md.ImageProperties()
    image.Init(t.Content().ContentProperties().Bytes, t.Content().ContentProperties().Pos)
    unit = t.ProcessUnits(0)
    assert unit.OptionsType() == md.ProcessUnitOptions.NormalizationOptions
    norm = md.NormalizationOptions()
    norm.Init(unit.Options().Bytes, unit.Options().Pos)
    return image, norm, t.Stats()


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


# --- the shared 64x64 exports (ghostnetv3_050, random-init, 1000 ImageNet labels) ------------------------------

def test_manifest_says_what_each_format_carries(small_exports):
    native = {t: r.manifest["native_metadata"] for t, r in small_exports.items()}
    assert native["onnx"]["format"] == "onnx metadata_props" and native["onnx"]["labels"] == "embedded"
    assert native["tflite"]["labels"] == "associated file" and "labels.txt" in native["tflite"]["associated_files"]
    assert native["coreml"]["labels"] == "embedded" and native["coreml"]["classifier"]["classes"] == 1000
    assert native["executorch"] == {**native["executorch"], "format": "sidecar", "labels": "sidecar",
                                    "sidecar": "manifest.json", "fields": []}
    # checked in the runtime during the export: the metadata changed no output bit
    assert native["onnx"]["outputs_unchanged"] is True and native["tflite"]["outputs_unchanged"] is True
    assert native["coreml"]["outputs_unchanged"] == "not checked (Core ML runtime needs macOS)"
    assert all("metadata" in r.manifest["timings_s"] for r in small_exports.values())


def test_onnx_metadata_props_read_by_onnx_and_onnxruntime(small_exports):
    import onnx
    import onnxruntime as ort

    res = small_exports["onnx"]
    m, path = res.manifest, res.out_dir / "model.onnx"
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model"] == "ghostnetv3_050" and props["weights_sha256"] == "random-init"
    assert props["author"].startswith("effai ") and props["license"] == m["model"]["weights_license"]
    assert json.loads(props["labels"]) == m["labels"] and len(m["labels"]) == 1000
    assert json.loads(props["preprocessing"]) == m["preprocessing"]
    assert json.loads(props["mean"]) == [0.485, 0.456, 0.406] and props["channel_order"] == "RGB"
    assert props["converter"].startswith("pytorch ") and proto.producer_name == "effai"
    assert "random-init" in proto.doc_string and "NCHW 1x3x64x64" in proto.graph.input[0].doc_string
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map == props and meta.producer_name == "effai"
    assert sorted(props) == m["native_metadata"]["fields"]


def test_tflite_metadata_read_with_the_metadata_schema_and_zipfile(small_exports):
    from ai_edge_litert.interpreter import Interpreter

    from effai.export._vendor import tflite_metadata_schema as md

    res = small_exports["tflite"]
    m, path = res.manifest, res.out_dir / "model.tflite"
    meta, archive = _read_tflite(path)
    assert meta.Name() == b"ghostnetv3_050" and meta.Version() == b"random-init"
    assert meta.Author().decode().startswith("effai ") and meta.License().decode() == m["model"]["weights_license"]
    assert meta.MinParserVersion() == b"1.0.0" and meta.SubgraphMetadataLength() == 1
    image, norm, stats = _input_units(meta)
    assert image.ColorSpace() == md.ColorSpaceType.RGB
    assert (image.DefaultSize().Width(), image.DefaultSize().Height()) == (SMALL, SMALL)
    # TFLite normalizes 0-255 pixels: (pixel - mean) / std with effai's mean/std times 255
    np.testing.assert_allclose(norm.MeanAsNumpy(), np.float32([0.485, 0.456, 0.406]) * 255, rtol=1e-6)
    np.testing.assert_allclose(norm.StdAsNumpy(), np.float32([0.229, 0.224, 0.225]) * 255, rtol=1e-6)
    np.testing.assert_allclose(stats.MinAsNumpy(), -np.float32([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-5)
    t_in = meta.SubgraphMetadata(0).InputTensorMetadata(0)
    assert [t_in.DimensionNames(i) for i in range(4)] == [b"batch", b"channels", b"height", b"width"]
    out = meta.SubgraphMetadata(0).OutputTensorMetadata(0)
    f = out.AssociatedFiles(0)
    assert f.Name() == b"labels.txt" and f.Type() == md.AssociatedFileType.TENSOR_AXIS_LABELS
    assert archive.read("labels.txt").decode().splitlines() == m["labels"]
    assert json.loads(archive.read("effai_metadata.json"))["model"] == "ghostnetv3_050"
    assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    interp = Interpreter(model_path=str(path))   # the runtime still loads the file with the zip appended
    interp.allocate_tensors()
    assert list(interp.get_input_details()[0]["shape"]) == [1, 3, SMALL, SMALL]


def test_coreml_spec_metadata_and_classifier(small_exports):
    import coremltools as ct

    res = small_exports["coreml"]
    m, path = res.manifest, res.out_dir / "model.mlpackage"
    spec = ct.utils.load_spec(str(path))
    d = spec.description
    assert d.metadata.author.startswith("effai ") and d.metadata.license == m["model"]["weights_license"]
    assert d.metadata.versionString == "random-init" and "GhostNetV3" in d.metadata.shortDescription
    user = dict(d.metadata.userDefined)
    assert user["model"] == "ghostnetv3_050" and json.loads(user["preprocessing"]) == m["preprocessing"]
    assert json.loads(user["std"]) == [0.229, 0.224, 0.225] and json.loads(user["input_size"]) == [SMALL, SMALL]
    assert user["layout"] == "NCHW" and user["interpolation"] == m["preprocessing"]["interpolation"]
    assert "com.github.apple.coremltools.version" in user   # coremltools' own entries are kept
    # a Core ML classifier: classLabel + {label: score}; the logits tensor stays an output (parity reads it)
    assert d.predictedFeatureName == "classLabel" and d.predictedProbabilitiesName == "classLabel_probs"
    assert [(o.name, o.type.WhichOneof("Type")) for o in d.output] == [
        ("classLabel", "stringType"), ("classLabel_probs", "dictionaryType"), ("logits", "multiArrayType")]
    fn = spec.mlProgram.functions["main"]
    op = fn.block_specializations[fn.opset].operations[-1]
    assert op.type == "classify" and op.inputs["probabilities"].arguments[0].name == "logits"
    classes = [v.immediateValue.tensor.strings.values[0]
               for v in op.inputs["classes"].arguments[0].value.immediateValue.list.values]
    assert classes == m["labels"]
    model = ct.models.MLModel(str(path), skip_model_load=True)
    assert model.user_defined_metadata["weights_sha256"] == "random-init" and model.author.startswith("effai ")
    assert [o["name"] for o in m["outputs"]] == ["logits"]


def test_coreml_classifier_keeps_checks_and_numerics(small_exports):
    """effai verify's structural check and the Linux evaluator still see the logits tensor after the classifier."""
    from effai.export.parity import TOLERANCES, compare
    from effai.export import coreml_mil

    res = small_exports["coreml"]
    report = verify(res.out_dir)
    assert report["hashes"] == "pass" and report["parity"]["structural"]["status"] == "pass", report
    assert report["parity"]["structural"]["classifier"] == {"label": "classLabel", "scores": "classLabel_probs"}
    x, ref = parity_samples(res.out_dir, res.manifest)
    got = coreml_mil.simulate(res.out_dir / "model.mlpackage", [x[:1]])
    assert len(got) == 1 and compare([ref[0][:1]], got, TOLERANCES["fp16"])["status"] == "pass"


@pytest.mark.parametrize("target", ["onnx", "tflite", "coreml"])
def test_embedding_is_deterministic_and_idempotent(small_exports, target, tmp_path):
    """The same description embedded twice gives the same bytes; embedding into an artifact that already carries
    metadata gives the same bytes again (entries are replaced, not appended)."""
    res = small_exports[target]
    m = res.manifest
    lowered = _lowered(m)
    info = metadata.describe(zoo.resolve_card("ghostnetv3_050"), "random-init", True, m["preprocessing"], m["labels"])
    model_file = res.out_dir / m["model_file"]
    copies = []
    for name in ("a", "b"):
        d = tmp_path / name
        shutil.copytree(res.out_dir, d)
        metadata.embed(TARGETS.get(target), d, lowered, info, None)
        copies.append(_digest(d / m["model_file"]))
    assert copies[0] == copies[1] == _digest(model_file)


def _lowered(m):
    from effai.export.targets import Lowered, TensorSpec

    return Lowered(m["model_file"], [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"], i["layout"])
                                     for i in m["inputs"]],
                   [TensorSpec(o["name"], tuple(o["shape"]), o["dtype"], o["layout"]) for o in m["outputs"]],
                   m["target_details"])


# --- a tiny greyscale classifier lowered directly: before/after in the runtime ------------------------------------

class Gray(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def gray_artifacts(tmp_path_factory):
    """{target: (dir, Lowered)} of the tiny greyscale model straight out of target.lower (no metadata yet)."""
    net, x = Gray().eval(), torch.randn(1, 1, 16, 16)
    out = {}
    for name in ("onnx", "tflite"):
        target = TARGETS.get(name)
        d = tmp_path_factory.mktemp(f"gray-{name}")
        program = torch.export.export(net, (x,)) if target.needs_exported_program else net
        out[name] = d, target.lower(program, (x,), LowerOptions(precision="fp32"), d)
    return out


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_outputs_are_bit_identical_before_and_after_embedding(gray_artifacts, target, tmp_path):
    raw, lowered = gray_artifacts[target]
    card = zoo.resolve_card("ghostnetv3_050.digits").with_(input_size=(1, 16, 16))
    info = metadata.describe(card, "ab" * 32, False, card.preprocessing(), zoo.labels(card))
    embedded = tmp_path / "embedded"
    shutil.copytree(raw, embedded)
    t = TARGETS.get(target)
    native = metadata.embed(t, embedded, lowered, info, np.zeros((1, 1, 16, 16), np.float32))
    assert native["outputs_unchanged"] is True
    assert _digest(raw / lowered.model_file) != _digest(embedded / lowered.model_file)
    x = np.random.RandomState(0).randn(4, 1, 1, 16, 16).astype(np.float32)
    before, after = t.load(raw, lowered), t.load(embedded, lowered)
    for xi in x:
        b, a = before.run([xi]), after.run([xi])
        assert [o.tobytes() for o in b] == [o.tobytes() for o in a] and np.abs(b[0]).max() > 0
    if target == "tflite":   # a greyscale model with trained weights: GRAYSCALE, 0.5 mean/std in 0-255 pixels
        from effai.export._vendor import tflite_metadata_schema as md

        meta, archive = _read_tflite(embedded / lowered.model_file)
        image, norm, _ = _input_units(meta)
        assert image.ColorSpace() == md.ColorSpaceType.GRAYSCALE
        assert norm.MeanAsNumpy().tolist() == [127.5] and norm.StdAsNumpy().tolist() == [127.5]
        assert meta.Version() == b"weights-sha256:" + b"ab" * 8 and "trained by effai" in meta.License().decode()
        assert archive.read("labels.txt").decode().split() == [str(i) for i in range(10)]


def test_no_verify_skips_the_runtime_check_and_executorch_is_left_alone(gray_artifacts, tmp_path):
    raw, lowered = gray_artifacts["onnx"]
    d = tmp_path / "a"
    shutil.copytree(raw, d)
    card = zoo.resolve_card("ghostnetv3_050.digits")
    info = metadata.describe(card, "random-init", True, card.preprocessing(), [])
    native = metadata.embed(TARGETS.get("onnx"), d, lowered, info, None)
    assert native["outputs_unchanged"] == "not checked (--no-verify)" and native["labels"] == "none"
    assert "labels" not in native["fields"] and "random-init" in info.description
    pte = tmp_path / "pte"
    pte.mkdir()
    (pte / "model.pte").write_bytes(b"not touched")
    native = metadata.embed(TARGETS.get("executorch"), pte, lowered, info, np.zeros((1, 1, 16, 16), np.float32))
    assert native["format"] == "sidecar" and (pte / "model.pte").read_bytes() == b"not touched"


# --- the embedded default model, end to end ----------------------------------------------------------------------

def test_digits_onnx_export_carries_trained_weights_metadata(tmp_path):
    import onnxruntime as ort

    loaded = zoo.create("ghostnetv3_050.digits")
    res = export(loaded, ExportConfig(target="onnx", eval="none", out=tmp_path / "digits"))
    props = ort.InferenceSession(str(res.out_dir / "model.onnx"),
                                 providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert props["weights_sha256"] == loaded.weights.sha256 != "random-init"
    assert props["version"] == f"weights-sha256:{loaded.weights.sha256[:16]}"
    assert json.loads(props["labels"]) == [str(i) for i in range(10)] and props["channels"] == "1"
    assert json.loads(props["mean"]) == [0.5] and props["license"] == loaded.card.weights_license
    assert res.manifest["native_metadata"]["outputs_unchanged"] is True and res.manifest["status"] == "pass"
