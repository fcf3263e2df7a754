"""Native metadata inside every exported artifact: what the model is and how to feed it, readable on the app side
with each format's own tooling, no effai needed. The pipeline's `metadata` stage runs after lower/parity and before
the manifest, which records what was embedded under `native_metadata`.

- Core ML: spec.description.metadata (author "effai <version>", license = the weights' licence, versionString,
  shortDescription, userDefined = FIELDS), input/output shortDescription; a classifier (coremltools' `classify`
  op: classLabel + {label: score}) when the model has one (1, num_classes) output. Read: ct.utils.load_spec(pkg).
- TFLite: the TFLite Metadata flatbuffer (schema 1.5.0, vendored reader/writer) in the model buffer named
  TFLITE_METADATA: name, description, version, author, license; the input's ImageProperties (RGB/GRAYSCALE, size),
  NormalizationOptions (mean/std in 0-255 pixels), Stats (normalized range); the output's labels.txt
  (TENSOR_AXIS_LABELS) and effai_metadata.json (the FIELDS), zipped onto the end of the .tflite as the metadata
  spec does. Read: ModelMetadata.GetRootAs(buffer) + zipfile.
- ONNX: ModelProto.metadata_props (FIELDS), doc_string, producer, graph input/output doc_string. Read: onnx.load,
  onnxruntime's get_modelmeta().custom_metadata_map.
- ExecuTorch: a .pte has no metadata section apps read: the artifact's manifest.json is the sidecar.

Embedding never changes numerics: weights and compute ops are untouched (Core ML's classify only maps the logits
to labels; the logits output stays). `embed` checks it where a runtime exists here: the outputs on a parity batch
before and after embedding must be bit-identical. The bytes written depend only on the artifact and the model's
description (no dates), so embedding the same artifact twice gives the same bytes.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effai.version import __version__
from effai.errors import EffaiError
from effai.files import atomic_write
from effai.registry import Registry

TFLITE_METADATA = "TFLITE_METADATA"     # the Metadata entry name TFLite's metadata readers look up
TFLITE_MIN_PARSER = "1.0.0"             # every field written here exists since TFLite Metadata schema 1.0.0
LABELS_FILE = "labels.txt"
INFO_FILE = "effai_metadata.json"       # TFLite: the FIELDS as JSON, a model-level associated file
CLASS_LABEL = "classLabel"              # Core ML classifier outputs: coremltools' ClassifierConfig defaults
CLASS_SCORES = "classLabel_probs"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)        # fixed zip entry times: the same bytes every time


@dataclass(frozen=True)
class ModelInfo:
    """What an artifact says about its model, whatever the format."""

    name: str
    description: str
    author: str                          # "effai <version>"
    license: str                         # the weights' licence
    version: str                         # "weights-sha256:<16 hex>" or "random-init"
    weights_sha256: str                  # or "random-init"
    preprocessing: dict[str, Any]        # the manifest's preprocessing block
    labels: tuple[str, ...]

    def fields(self) -> dict[str, str]:
        """The key/value strings of ONNX metadata_props and Core ML userDefined metadata: the model, its weights,
        every preprocessing parameter (lists as JSON) and the labels (a JSON list)."""
        p = self.preprocessing
        out = {"model": self.name, "description": self.description, "author": self.author, "license": self.license,
               "version": self.version, "weights_sha256": self.weights_sha256,
               "preprocessing": _json(p)}
        for key in ("input_size", "channels", "channel_order", "layout", "scale", "mean", "std", "interpolation",
                    "crop_pct"):
            if key in p:
                out[key] = p[key] if isinstance(p[key], str) else _json(p[key])
        if self.labels:
            out["labels"] = _json(list(self.labels))
        return out

    def input_text(self, shape: tuple[int, ...], dtype: str) -> str:
        """One line an app developer reads in Xcode / Netron / the TFLite metadata: what to feed."""
        p = self.preprocessing
        kind = "RGB" if p.get("channels") == 3 else "greyscale" if p.get("channels") == 1 else "multi-channel"
        return (f"{kind} image, {dtype} {p.get('layout', 'NCHW')} {'x'.join(map(str, shape))}: "
                f"{p.get('recipe', 'see preprocessing')}; mean {p.get('mean')}, std {p.get('std')}")


def describe(card: Any, weights_sha256: str, random_init: bool, preprocessing: dict[str, Any],
             labels: list[str]) -> ModelInfo:
    """ModelInfo from the model card, its weights' hash and the manifest's preprocessing and labels."""
    sha = "random-init" if random_init or not weights_sha256 else weights_sha256
    text = card.description or card.name
    if sha == "random-init":
        text += " (random-init weights: not trained, for testing the pipeline only)"
    return ModelInfo(name=card.name, description=text, author=f"effai {__version__}",
                     license=card.weights_license or "unknown",
                     version="random-init" if sha == "random-init" else f"weights-sha256:{sha[:16]}",
                     weights_sha256=sha, preprocessing=dict(preprocessing), labels=tuple(labels))


@dataclass(frozen=True)
class Writer:
    write: Callable[[Path, Any, ModelInfo], dict[str, Any]]   # (artifact dir, Lowered, info) -> native_metadata
    modifies_model: bool = True                               # False: nothing to check before/after


WRITERS: Registry[Writer] = Registry("metadata writer")


def _writer(target: str, modifies_model: bool = True) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        WRITERS.register(target, Writer(fn, modifies_model))
        return fn
    return add


def embed(target: Any, root: Path, lowered: Any, info: ModelInfo, probe: np.ndarray | None) -> dict[str, Any]:
    """Write `info` into the artifact at root the target's native way; the manifest's `native_metadata` block.

    probe: one batch of model inputs: where a runtime exists here, the outputs before and after embedding must be
    bit-identical (EffaiError otherwise); None skips that check (--no-verify)."""
    writer = WRITERS.get(target.name)
    if not writer.modifies_model:
        return {**writer.write(root, lowered, info), "outputs_unchanged": "model file not modified"}
    before = _outputs(target, root, lowered, probe)
    native = writer.write(root, lowered, info)
    if native.get("skipped"):
        native["outputs_unchanged"] = "model file not modified"
    elif probe is None:
        native["outputs_unchanged"] = "not checked (--no-verify)"
    elif isinstance(before, str):
        native["outputs_unchanged"] = f"not checked ({before})"
    else:
        try:
            after = _outputs(target, root, lowered, probe)
        except Exception as e:   # e.g. a runtime refusing what was added (Core ML on macOS: the classifier)
            raise EffaiError(f"the {target.name} artifact no longer runs after embedding its metadata "
                             f"({type(e).__name__}: {str(e).strip()[:200]}): an effai bug; please report it") from e
        assert not isinstance(after, str)
        if len(after) != len(before) or any(a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes()
                                            for a, b in zip(after, before)):
            raise EffaiError(f"embedding {target.name} metadata changed the model's outputs: an effai bug; please "
                             "report it (the export log is kept in the temp directory)")
        native["outputs_unchanged"] = True
    return native


def summary(native: dict[str, Any]) -> str:
    """The stage's one-line detail."""
    if native.get("skipped"):
        return f"skipped: {native['skipped']}"
    if native["format"] == "sidecar":
        return f"none in the model file: {native['sidecar']} is the sidecar"
    s = f"{len(native['fields'])} fields, labels {native['labels']}"
    if native.get("classifier"):
        s += f", classifier ({native['classifier']['classes']} classes)"
    if native.get("outputs_unchanged") is True:
        s += ", outputs bit-identical"
    return s


def _outputs(target: Any, root: Path, lowered: Any, probe: np.ndarray | None) -> list[np.ndarray] | str | None:
    if probe is None:
        return None
    predictor = target.load(root, lowered)
    if isinstance(predictor, str):
        return predictor
    return [np.array(o, copy=True) for o in predictor.run([np.ascontiguousarray(probe)])]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


# ------------------------------------------------------------------------------------------------------- ONNX

@_writer("onnx")
def write_onnx(root: Path, lowered: Any, info: ModelInfo) -> dict[str, Any]:
    """ModelProto.metadata_props (replacing entries of the same keys), doc_string, producer (effai; the exporter
    that wrote the graph moves to metadata_props "converter") and the graph inputs'/outputs' doc_string."""
    import onnx

    path = root / lowered.model_file
    proto = onnx.load(str(path), load_external_data=False)   # weights past 2 GB stay in model.onnx.data, untouched
    fields = info.fields()
    existing = {p.key: p.value for p in proto.metadata_props}
    converter = (existing.get("converter") if proto.producer_name == "effai"
                 else f"{proto.producer_name} {proto.producer_version}".strip())
    if converter:
        fields["converter"] = converter
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in fields]
    del proto.metadata_props[:]
    for key, value in kept + list(fields.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = info.description
    proto.producer_name, proto.producer_version = "effai", __version__
    for v, spec in zip(proto.graph.input, lowered.inputs):
        v.doc_string = info.input_text(spec.shape, spec.dtype)
    for v in proto.graph.output:
        v.doc_string = _output_text(info, len(proto.graph.output))
    atomic_write(path, proto.SerializeToString(deterministic=True))
    return {"format": "onnx metadata_props", "fields": sorted(fields), "labels": "embedded" if info.labels else "none",
            "also": ["doc_string", "producer_name", "producer_version", "graph input/output doc_string"],
            "read_with": "onnx.load(path).metadata_props; onnxruntime InferenceSession.get_modelmeta()"
                         ".custom_metadata_map"}


def _output_text(info: ModelInfo, n_outputs: int) -> str:
    if n_outputs == 1 and info.labels:
        return (f"raw class scores (logits, no softmax) for {len(info.labels)} classes, in the order of the "
                f"labels; apply softmax for probabilities")
    return "model output"


# ----------------------------------------------------------------------------------------------------- Core ML

@_writer("coreml")
def write_coreml(root: Path, lowered: Any, info: ModelInfo) -> dict[str, Any]:
    """spec.description.metadata and feature descriptions; a classifier (coremltools' `classify` op over the
    logits, which stay an output) when the model has one (1, num_classes) float32 output. Only the package's spec
    file (model.mlmodel) is rewritten: weights and Manifest.json stay as coremltools wrote them."""
    import coremltools as ct

    package = root / lowered.model_file
    spec_file = _coreml_spec_file(package)
    spec = ct.utils.load_spec(str(package))
    md = spec.description.metadata
    md.author, md.license, md.versionString, md.shortDescription = (info.author, info.license, info.version,
                                                                      info.description)
    fields = info.fields()
    for key, value in fields.items():
        md.userDefined[key] = value
    for feature, tensor in zip(spec.description.input, lowered.inputs):
        feature.shortDescription = info.input_text(tensor.shape, tensor.dtype)
    tensors = [f for f in spec.description.output if f.type.WhichOneof("Type") == "multiArrayType"]
    for feature in tensors:
        feature.shortDescription = _output_text(info, len(tensors))
    classifier, why_not = _coreml_classifier(spec, info)
    atomic_write(spec_file, spec.SerializeToString(deterministic=True))
    return {"format": "coreml model metadata", "fields": ["author", "license", "shortDescription", "versionString"]
            + sorted(f"userDefined.{k}" for k in fields),
            "labels": "embedded" if info.labels else "none",
            "classifier": classifier, **({"classifier_not_added": why_not} if why_not else {}),
            "read_with": "coremltools: ct.utils.load_spec(path).description.metadata (or MLModel(path)"
                         ".user_defined_metadata); Xcode's model view"}


def _coreml_spec_file(package: Path) -> Path:
    """The spec file inside an .mlpackage, as its Manifest.json names it (Data/<path of the root model item>)."""
    try:
        manifest = json.loads((package / "Manifest.json").read_text())
        item = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
        path = package / "Data" / item["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EffaiError(f"{package} has no readable Manifest.json ({type(e).__name__}: {e}); re-export it") from e
    if not path.is_file():
        raise EffaiError(f"{package}: its Manifest.json names {item['path']}, which is missing; re-export it")
    return path


def _coreml_classifier(spec: Any, info: ModelInfo) -> tuple[dict[str, Any] | None, str | None]:
    """Make the ML program a Core ML classifier in place; (what was added, None) or (None, why not).

    coremltools' ClassifierConfig appends a `classify` op (probabilities -> class label + {label: score}) and
    replaces the score output with its two outputs. Here the op is appended and its outputs are added in front of
    the logits output, which stays: numerics and effai's parity/structural checks see the same tensor. classify
    maps the scores as they are (no softmax): `classLabel` is the arg-max label."""
    outs = list(spec.description.output)
    n = len(info.labels)
    if spec.description.predictedFeatureName:
        return None, f"already a classifier ({spec.description.predictedFeatureName}): left as it is"
    if not n:
        return None, "the model has no labels"
    if len(outs) != 1 or outs[0].type.WhichOneof("Type") != "multiArrayType":
        return None, f"{len(outs)} outputs; a classifier needs one class-score output"
    scores = outs[0]
    shape = [int(d) for d in scores.type.multiArrayType.shape]
    if shape not in ([1, n], [n]):
        return None, f"output shape {shape} is not (1, {n}) (one image of {n} class scores)"
    if scores.type.multiArrayType.dataType != 65568:   # ArrayFeatureType.FLOAT32: classify takes fp32
        return None, "the class scores are not float32"
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    if list(block.outputs) != [scores.name] or {CLASS_LABEL, CLASS_SCORES} & {f.name for f in spec.description.input}:
        return None, "the program's outputs do not match its description"
    op, features = _classify_template(list(info.labels), shape)
    op.inputs["probabilities"].arguments[0].name = scores.name
    block.operations.add().CopyFrom(op)
    del block.outputs[:]
    block.outputs.extend([CLASS_LABEL, CLASS_SCORES, scores.name])
    del spec.description.output[:]
    spec.description.output.extend([*features, scores])
    spec.description.predictedFeatureName = CLASS_LABEL
    spec.description.predictedProbabilitiesName = CLASS_SCORES
    return {"predicted_feature": CLASS_LABEL, "scores": CLASS_SCORES, "classes": n,
            "scores_are": f"the {scores.name} output as {{label: score}} (raw logits, no softmax)",
            "tensor_output_kept": scores.name}, None


def _classify_template(labels: list[str], shape: list[int]) -> tuple[Any, list[Any]]:
    """The `classify` op and the two output feature descriptions exactly as coremltools 9 serializes them for
    ClassifierConfig(labels): converted from a one-op ML program (scores -> identity -> classify)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=tuple(shape))], opset_version=ct.target.iOS15)
    def program(x: Any) -> Any:
        return mb.identity(x=x)

    model = ct.convert(program, convert_to="mlprogram", classifier_config=ct.ClassifierConfig(labels),
                       compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS15,
                       skip_model_load=True)
    spec = model.get_spec()
    fn = spec.mlProgram.functions["main"]
    op = fn.block_specializations[fn.opset].operations[-1]
    features = {f.name: f for f in spec.description.output}
    if op.type != "classify" or set(features) != {CLASS_LABEL, CLASS_SCORES}:
        raise EffaiError(f"coremltools {ct.__version__} builds classifiers differently than effai expects "
                         f"(last op {op.type!r}, outputs {sorted(features)}); use coremltools 9")
    return op, [features[CLASS_LABEL], features[CLASS_SCORES]]


# ------------------------------------------------------------------------------------------------------ TFLite

@_writer("tflite")
def write_tflite(root: Path, lowered: Any, info: ModelInfo) -> dict[str, Any]:
    """The TFLite Metadata flatbuffer in a model buffer named TFLITE_METADATA, then labels.txt and
    effai_metadata.json zipped (stored, fixed times) onto the end of the file, as the TFLite Metadata spec and
    tflite-support's MetadataPopulator do; TFLite's loader ignores the trailing zip."""
    from ai_edge_litert import schema_py_generated as tfl

    path = root / lowered.model_file
    buf = path.read_bytes()
    if not tfl.Model.ModelBufferHasIdentifier(buf, 0):
        raise EffaiError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier); re-export it")
    model = tfl.ModelT.InitFromPackedBuf(buf, 0)
    if any(b.offset > 1 for b in model.buffers or []):
        return {"format": "tflite metadata", "fields": [], "labels": "none",
                "skipped": "the model keeps its weights outside the flatbuffer (over 2 GB): not rewritten"}
    subgraph = model.subgraphs[0]
    inputs = [subgraph.tensors[i] for i in subgraph.inputs]
    n_out = len(subgraph.outputs)
    files = {INFO_FILE: (_json(info.fields()) + "\n").encode()}
    labelled = bool(info.labels) and n_out == 1
    if labelled:
        files[LABELS_FILE] = ("\n".join(info.labels) + "\n").encode()
    meta, fields = _tflite_metadata(info, inputs, lowered, n_out, labelled)
    _set_metadata_buffer(model, tfl, meta)
    packed = _pack_model(model, tfl)
    atomic_write(path, _with_zip(packed, files))
    return {"format": "tflite metadata", "fields": fields,
            "labels": "associated file" if labelled else ("embedded" if info.labels else "none"),
            "associated_files": sorted(files), "min_parser_version": TFLITE_MIN_PARSER,
            "read_with": "TFLite Metadata schema reader (ModelMetadata.GetRootAs on the TFLITE_METADATA buffer; "
                         "tflite_support MetadataDisplayer) + zipfile for the associated files"}


def _tflite_metadata(info: ModelInfo, inputs: list[Any], lowered: Any, n_out: int,
                     labelled: bool) -> tuple[bytes, list[str]]:
    """(the ModelMetadata flatbuffer (file identifier M001), the fields set). TFLite normalizes pixels in 0-255:
    x = (pixel - mean) / std, so effai's (pixel/255 - mean) / std becomes mean*255, std*255."""
    import flatbuffers

    from effai.export._vendor import tflite_metadata_schema as md

    p = info.preprocessing
    fields = ["name", "description", "version", "author", "license", "min_parser_version",
              f"associated_files ({INFO_FILE})", "input.name", "input.description", "input.content.ImageProperties"]
    mean = [float(m) * 255.0 for m in p.get("mean", [])]
    std = [float(s) * 255.0 for s in p.get("std", [])]
    tensors = []
    for k, (tensor, spec) in enumerate(zip(inputs, lowered.inputs)):
        t = md.TensorMetadataT()
        t.name = "image" if len(inputs) == 1 else f"image_{k}"
        t.description = info.input_text(spec.shape, spec.dtype)
        if spec.layout == "NCHW" and len(spec.shape) == 4:
            t.dimensionNames = ["batch", "channels", "height", "width"]
            fields += ["input.dimension_names"] if k == 0 else []
        t.content = md.ContentT()
        t.content.contentPropertiesType = md.ContentProperties.ImageProperties
        image = md.ImagePropertiesT()
        image.colorSpace = {3: md.ColorSpaceType.RGB, 1: md.ColorSpaceType.GRAYSCALE}.get(
            p.get("channels"), md.ColorSpaceType.UNKNOWN)
        size = p.get("input_size") or []
        if len(size) == 2:
            image.defaultSize = md.ImageSizeT()
            image.defaultSize.height, image.defaultSize.width = int(size[0]), int(size[1])
        t.content.contentProperties = image
        if mean and std and len(mean) == len(std):
            unit = md.ProcessUnitT()
            unit.optionsType = md.ProcessUnitOptions.NormalizationOptions
            unit.options = md.NormalizationOptionsT()
            unit.options.mean, unit.options.std = mean, std
            t.processUnits = [unit]
            fields += ["input.process_units.NormalizationOptions"] if k == 0 else []
            if tensor.type == 0:   # FLOAT32: the normalized range, as tflite-support's image writers record it
                t.stats = md.StatsT()
                t.stats.min = [(0.0 - m) / s for m, s in zip(mean, std)]
                t.stats.max = [(255.0 - m) / s for m, s in zip(mean, std)]
                fields += ["input.stats"] if k == 0 else []
        tensors.append(t)
    outputs = []
    for k in range(n_out):
        t = md.TensorMetadataT()
        t.name = "logits" if n_out == 1 else f"output_{k}"
        t.description = _output_text(info, n_out)
        t.content = md.ContentT()
        t.content.contentPropertiesType = md.ContentProperties.FeatureProperties
        t.content.contentProperties = md.FeaturePropertiesT()
        if labelled:
            f = md.AssociatedFileT()
            f.name, f.type = LABELS_FILE, md.AssociatedFileType.TENSOR_AXIS_LABELS
            f.description = f"{len(info.labels)} class names, one a line, in the order of the scores"
            t.associatedFiles = [f]
        outputs.append(t)
    fields += ["output.name", "output.description"] + ([f"output.associated_files ({LABELS_FILE}, "
                                                       "TENSOR_AXIS_LABELS)"] if labelled else [])
    sub = md.SubGraphMetadataT()
    sub.inputTensorMetadata, sub.outputTensorMetadata = tensors, outputs
    model = md.ModelMetadataT()
    model.name, model.description, model.version = info.name, info.description, info.version
    model.author, model.license, model.minParserVersion = info.author, info.license, TFLITE_MIN_PARSER
    model.subgraphMetadata = [sub]
    f = md.AssociatedFileT()
    f.name, f.type = INFO_FILE, md.AssociatedFileType.DESCRIPTIONS
    f.description = "effai: model, weights sha256, preprocessing and labels (JSON)"
    model.associatedFiles = [f]
    b = flatbuffers.Builder(0)
    b.Finish(model.Pack(b), b"M001")
    return bytes(b.Output()), fields


def _set_metadata_buffer(model: Any, tfl: Any, data: bytes) -> None:
    """Put `data` in the buffer of the model's TFLITE_METADATA entry (added when missing)."""
    buffer = tfl.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers = model.buffers or []
    model.metadata = model.metadata or []
    for entry in model.metadata:
        if (entry.name.decode() if isinstance(entry.name, bytes) else entry.name) == TFLITE_METADATA:
            model.buffers[entry.buffer] = buffer
            return
    model.buffers.append(buffer)
    entry = tfl.MetadataT()
    entry.name, entry.buffer = TFLITE_METADATA, len(model.buffers) - 1
    model.metadata.append(entry)


def _pack_model(model: Any, tfl: Any) -> bytes:
    """model packed as a TFLite flatbuffer ("TFL3"), each buffer's data 16-byte aligned as the TFLite converter
    writes it (flatbuffers' object API would align bytes to 1)."""
    import flatbuffers

    class AlignedBuffer(tfl.BufferT):  # type: ignore[misc, name-defined]
        def Pack(self, builder: Any) -> int:
            data = None
            if self.data is not None and len(self.data):
                raw = np.asarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(raw), 16)
                builder.head -= len(raw)
                builder.Bytes[builder.head:builder.head + len(raw)] = raw
                data = builder.EndVector()
            tfl.BufferStart(builder)
            if data is not None:
                tfl.BufferAddData(builder, data)
            tfl.BufferAddOffset(builder, self.offset)
            tfl.BufferAddSize(builder, self.size)
            return tfl.BufferEnd(builder)

    for b in model.buffers:
        b.__class__ = AlignedBuffer
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), b"TFL3")
    return bytes(builder.Output())


def _with_zip(model: bytes, files: dict[str, bytes]) -> bytes:
    """model followed by a zip of `files` (stored, entries sorted, fixed times and permissions)."""
    out = io.BytesIO()
    out.write(model)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(files):
            entry = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            entry.external_attr = 0o644 << 16
            entry.create_system = 3
            zf.writestr(entry, files[name])
    return out.getvalue()


# -------------------------------------------------------------------------------------------------- ExecuTorch

@_writer("executorch", modifies_model=False)
def write_executorch(root: Path, lowered: Any, info: ModelInfo) -> dict[str, Any]:
    """Nothing to write: the .pte format has no metadata section apps read. The artifact's manifest.json is the
    sidecar (preprocessing, labels, model, weights sha256 and licence)."""
    return {"format": "sidecar", "fields": [], "labels": "sidecar" if info.labels else "none",
            "sidecar": "manifest.json",
            "reason": ".pte has no metadata section apps read; ship manifest.json (preprocessing, labels, model, "
                      "weights sha256, licence) beside model.pte",
            "read_with": "any JSON reader: manifest.json `preprocessing`, `labels`, `model`"}
