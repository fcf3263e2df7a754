"""TFLite target: litert-torch -> .tflite, run by the ai-edge-litert Interpreter (tflite_runtime as a fallback).

Quantized precisions are applied to the float .tflite by ai-edge-quantizer recipes (int8 `static_wi8_ai8`, float
I/O unless `--io-dtype int8`); layers in LowerOptions.float_layers are found by weight content (layer_map) and
their ops get `no_quantize`. Per precision, and why not litert-torch's PT2E path: docs/quantization.md,
"effai/export/targets/tflite.py".
"""

from __future__ import annotations

import io as io_
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import EffaiError
from effai.export.metadata import (INFO_FILE, LABELS_FILE, TFLITE_METADATA, TFLITE_MIN_PARSER, ZIP_TIME, ModelInfo,
                                   output_text, to_json)
from effai.files import atomic_write
from effai.export.targets.base import (TARGETS, LayerRule, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)


class TFLiteTarget:
    name = "tflite"
    description = "TFLite / LiteRT flatbuffer via litert-torch (Android, microcontrollers, Coral)"
    precisions = ("fp32", "int8", "int8-dynamic", "int8-weight", "int4-weight", "fp16")
    needs_exported_program = False
    unsupported: dict[str, str] = {}
    quantizes = {   # ai-edge-quantizer's default policy: weight-only int4 has no DEPTHWISE_CONV_2D kernel
        "int4-weight": LayerRule(frozenset({"conv", "linear"})),
    }

    def available(self) -> tuple[bool, str]:
        return require(("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert"), extra="tflite")

    def lower(self, model: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        import litert_torch

        edge_model = litert_torch.convert(model.eval(), example_inputs)
        path = out_dir / "model.tflite"
        edge_model.export(str(path))
        quant = None
        if options.precision != "fp32":
            quant = quantize(path, model, options)
        interp = _interpreter(path)
        ops: dict[str, int] = {}
        try:
            for op in interp._get_ops_details():
                ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
        except Exception:  # private API: the op census is a nicety, not a requirement
            ops = {}
        return Lowered(
            model_file=path.name,
            inputs=[_spec(d, "NCHW") for d in interp.get_input_details()],
            outputs=[_spec(d, None) for d in interp.get_output_details()],
            details={"ops": ops, "converter": "litert-torch", **({"quantization": quant} if quant else {})},
        )

    metadata_modifies_model = True             # False: nothing to check before/after embedding

    def write_metadata(self, root: Path, lowered: Lowered, info: ModelInfo) -> dict[str, Any]:
        """The model's description in the model file, this format's native way (effai.export.metadata)."""
        return write_tflite(root, lowered, info)

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        from effai.export.quiet import runtime_quiet

        with runtime_quiet():   # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." off the user's terminal
            interp = _interpreter(out_dir / lowered.model_file)
            interp.allocate_tensors()
        ins = interp.get_input_details()
        outs = interp.get_output_details()
        runtime, version = _runtime_name()

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            for d, x in zip(ins, inputs):
                interp.set_tensor(d["index"], _to_input(x, d))
            interp.invoke()
            return [_from_output(interp.get_tensor(d["index"]), d) for d in outs]

        return Predictor(runtime, version, run)

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> None:
        return None


def _to_input(x: np.ndarray, d: dict) -> np.ndarray:
    """Float samples into the tensor's dtype: integer inputs are quantized with the tensor's scale/zero-point."""
    dtype = np.dtype(d["dtype"])
    if dtype.kind in "iu":
        scale, zero = d["quantization"]
        info = np.iinfo(dtype)
        return np.ascontiguousarray(np.clip(np.rint(x / scale + zero), info.min, info.max).astype(dtype))
    return np.ascontiguousarray(x, dtype=dtype)


def _from_output(y: np.ndarray, d: dict) -> np.ndarray:
    if np.dtype(d["dtype"]).kind in "iu":
        scale, zero = d["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y.copy()


def _recipe(precision: str) -> Any:
    from ai_edge_quantizer import recipe

    if precision == "fp16":
        return [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
                 "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}}]
    return {"int8": recipe.static_wi8_ai8, "int8-dynamic": recipe.dynamic_wi8_afp32,
            "int8-weight": recipe.weight_only_wi8_afp32, "int4-weight": recipe.weight_only_wi4_afp32}[precision]()


def quantize(path: Path, model: Any, options: LowerOptions) -> dict[str, Any]:
    """Rewrite the float .tflite at `path` in place with ai-edge-quantizer; returns what was done."""
    from ai_edge_quantizer import quantizer as aeq

    from effai.errors import EffaiError, UsageError

    q = aeq.Quantizer(str(path), _recipe(options.precision))
    if options.precision == "int8" and options.io_dtype == "float":
        for io in ("INPUT", "OUTPUT"):  # graph edges stay float32: a QUANTIZE / DEQUANTIZE op is inserted
            q.update_quantization_recipe(regex=".*", operation_name=io, algorithm_key="no_quantize")
    kept, unmatched = [], []
    if options.float_layers:
        kept, unmatched = _keep_float(path, model, options.float_layers)
        for name in kept:
            # an op's scope is its output tensor names joined and ended by ';' (ai-edge-quantizer get_op_scope)
            q.update_quantization_recipe(regex=f"(^|;){re.escape(name)};", operation_name="*",
                                         algorithm_key="no_quantize")
    calibrated = 0
    calib = None
    if q.need_calibration:
        if options.calibration is None:
            raise UsageError("tflite int8 needs calibration data: pass --calib DIR|digits|photos")
        key, batch = _signature_input(path)
        data = [{key: np.ascontiguousarray(options.calibration[i:i + batch])}
                for i in range(0, options.calibration.shape[0] - batch + 1, batch)]
        calibrated = len(data) * batch
        calib = q.calibrate({"serving_default": data}, num_threads=1)
        bad = [k for k, v in calib.items() if v and not all(np.all(np.isfinite(np.asarray(a))) for a in v.values())]
        if bad:
            raise EffaiError(f"calibration produced non-finite ranges for {len(bad)} tensor(s), first {bad[0]!r}: "
                             "check the --calib images and the model's numerics")
    result = q.quantize(calib, enable_progress_bar=False, enable_progress_report=False)
    tmp = path.with_suffix(".quant.tflite")
    tmp.write_bytes(result.quantized_model)
    tmp.replace(path)
    return {"scheme": {"int8": "ai-edge-quantizer static_wi8_ai8 (per-channel int8 weights, min/max int8 "
                               "activations)",
                       "int8-dynamic": "ai-edge-quantizer dynamic_wi8_afp32",
                       "int8-weight": "ai-edge-quantizer weight_only_wi8_afp32",
                       "int4-weight": "ai-edge-quantizer weight_only_wi4_afp32",
                       "fp16": "ai-edge-quantizer float_casting (fp16 weights)"}[options.precision],
            "io_dtype": options.io_dtype if options.precision == "int8" else "float",
            "calibration_samples": calibrated, "float_layers": list(options.float_layers),
            "float_tensors": kept, "unmatched_float_layers": unmatched}


def _keep_float(path: Path, model: Any, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Output-tensor names of the ops that consume the named torch layers' weights (matched by content)."""
    from effai.export.layer_map import layer_weights, match

    interp = _interpreter(path)
    weights, owners = {}, {}
    for d in interp.get_tensor_details():
        try:
            v = interp.get_tensor(d["index"])
        except ValueError:
            continue
        if v.ndim >= 2:
            weights[d["index"]] = v
    ops = interp._get_ops_details()
    for op in ops:
        for i in op["inputs"]:
            if i in weights:
                owners.setdefault(i, []).extend(op["outputs"])
    names_by_index = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    found = match(layer_weights(model, names), weights)
    kept, unmatched = [], []
    for layer, idxs in found.items():
        outs = [names_by_index[o] for i in idxs for o in owners.get(i, [])]
        (kept.extend(outs) if outs else unmatched.append(layer))
    return sorted(set(kept)), unmatched


def _signature_input(path: Path) -> tuple[str, int]:
    """(the serving signature's input name, the exported batch size), from one interpreter."""
    interp = _interpreter(path)
    key = next(iter(interp.get_signature_runner("serving_default").get_input_details()))
    return key, int(interp.get_input_details()[0]["shape"][0])


def _interpreter(path: Path, threads: int | None = None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # boards that only have the legacy runtime take the same code path
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    return Interpreter(model_path=str(path), num_threads=threads)


def _runtime_name() -> tuple[str, str]:
    v = package_versions("ai-edge-litert")["ai-edge-litert"]
    if v != "not installed":
        return "ai-edge-litert", v
    return "tflite-runtime", package_versions("tflite-runtime")["tflite-runtime"]


def _spec(d: dict, layout: str | None) -> TensorSpec:
    shape = tuple(int(s) for s in d["shape"])
    dtype = np.dtype(d["dtype"])
    q = (float(d["quantization"][0]), int(d["quantization"][1])) if dtype.kind in "iu" else None
    return TensorSpec(d["name"], shape, dtype.name, layout or layout_for(shape), q)


# ------------------------------------------------------------------------------------------------------ TFLite

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
    outside = [b for b in model.buffers or [] if b.offset > 1]
    if outside:   # ai-edge-quantizer stores buffers after the flatbuffer (offset/size), whatever the model's size
        if len(buf) >= (2 << 30) - (1 << 20):
            return {"format": "tflite metadata", "fields": [], "labels": "none",
                    "skipped": f"the model is {len(buf) / 2**30:.1f} GB, too large for one flatbuffer (2 GB): its "
                               "weights stay outside it and the file is not rewritten"}
        for b in outside:   # inline them: a flatbuffer under 2 GB holds its buffers itself
            b.data, b.offset, b.size = np.frombuffer(buf[b.offset:b.offset + b.size], np.uint8), 0, 0
    subgraph = model.subgraphs[0]
    inputs = [subgraph.tensors[i] for i in subgraph.inputs]
    n_out = len(subgraph.outputs)
    files = {INFO_FILE: (to_json(info.fields()) + "\n").encode()}
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
        t.description = output_text(info, n_out)
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
    out = io_.BytesIO()
    out.write(model)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(files):
            entry = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            entry.external_attr = 0o644 << 16
            entry.create_system = 3
            zf.writestr(entry, files[name])
    return out.getvalue()


TARGETS.register("tflite", TFLiteTarget())
