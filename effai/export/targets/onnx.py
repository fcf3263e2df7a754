"""ONNX target: torch.onnx dynamo export -> onnxslim -> .onnx (weights inline when < 2 GB), run by onnxruntime.

Precisions: fp32 (the slimmed float graph); int8, onnxruntime static quantization of the slimmed float graph, QDQ
(`quantize_int8`); int8-dynamic, onnxruntime dynamic quantization of MatMul/Gemm weights (`quantize_int8_dynamic`).
The quantized graph is never slimmed: onnxslim's constant folding would fold each weight's DequantizeLinear back
into a float constant and undo the quantization.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import EffaiError, UsageError, choices_hint
from effai.version import __version__
from effai.export.metadata import ModelInfo, output_text
from effai.files import atomic_write
from effai.export.targets.base import (TARGETS, LayerRule, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)

OPSET = 18                 # the dynamo exporter's native opset; onnxruntime >= 1.16 runs it
INLINE_LIMIT = 2 * 1024**3  # protobuf's hard limit: larger models keep weights in model.onnx.data
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")   # int8-dynamic: see quantize_int8_dynamic for why Conv is left out
# Ops that only move or re-type a weight on its way to the layer that uses it (followed when mapping float_layers)
PASS_THROUGH_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearConv",
               "QLinearMatMul", "QGemm"}
SCHEMES = {
    "int8": "static QDQ: int8 symmetric per-channel weights (7-bit range, reduce_range), uint8 asymmetric "
            "per-tensor activations calibrated with MinMax",
    "int8-dynamic": "dynamic: int8 symmetric per-channel weights (7-bit range, reduce_range) on MatMul/Gemm, uint8 "
                    "activations quantized per run; Conv stays float",
}


class OnnxTarget:
    name = "onnx"
    description = "ONNX (opset 18, simplified with onnxslim) for onnxruntime / ONNX Runtime Mobile"
    precisions = ("fp32", "int8", "int8-dynamic")
    needs_exported_program = True
    unsupported: dict[str, str] = {}
    quantizes = {"int8-dynamic": LayerRule(frozenset({"linear"}))}   # MatMul/Gemm only (DYNAMIC_OP_TYPES)

    def available(self) -> tuple[bool, str]:
        return require(("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"),
                       ("onnxslim", "onnxslim"), extra="onnx")

    def lower(self, exported: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        calibration, keep_float = None, {}
        if options.precision == "int8":   # inputs are checked before the (slow) export, so bad ones fail fast
            calibration = check_calibration(options.calibration, example_inputs)
        if options.precision != "fp32":
            keep_float = float_layer_weights(exported, options.float_layers)
        proto, nodes_before = export_float(exported, example_inputs, options)
        nodes_float = len(proto.graph.node)
        quantization = None
        if options.precision != "fp32":
            with tempfile.TemporaryDirectory(prefix="effai-onnx-quant-") as work:
                proto, quantization = quantize(proto, keep_float, calibration, options, Path(work))
        path = out_dir / "model.onnx"
        large = save(proto, path)
        details = {"opset": OPSET, "nodes_before_slim": nodes_before, "nodes_float": nodes_float,
                   "nodes": len(proto.graph.node), "ops": op_census(proto), "external_data": large,
                   "precision": options.precision}
        if quantization is not None:
            details["quantization"] = quantization
            if quantization["unmatched_float_layers"]:
                details["warnings"] = [f"float layer(s) {', '.join(quantization['unmatched_float_layers'])} have no "
                                       "weight of their own in the ONNX graph (fused into another op): not kept "
                                       "in float"]
            if options.precision == "int8-dynamic":
                done, total = quantization["layers_quantized"], quantization["layers_total"]
                if done < total:
                    details.setdefault("warnings", []).append(
                        f"int8-dynamic quantized {done} of {total} Conv/Linear layers (ONNX Runtime dynamic "
                        "quantization takes MatMul/Gemm only; Conv stays float): for a CNN use -q int8")
        return Lowered(
            model_file=path.name,
            inputs=[_spec(v, "NCHW") for v in proto.graph.input],
            outputs=[_spec(v, None) for v in proto.graph.output],
            details=details,
        )

    metadata_modifies_model = True             # False: nothing to check before/after embedding

    def write_metadata(self, root: Path, lowered: Lowered, info: ModelInfo) -> dict[str, Any]:
        """The model's description in the model file, this format's native way (effai.export.metadata)."""
        return write_onnx(root, lowered, info)

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        sess = ort.InferenceSession(str(out_dir / lowered.model_file), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            return [np.asarray(o) for o in sess.run(None, dict(zip(names, inputs)))]

        return Predictor("onnxruntime-cpu", package_versions("onnxruntime")["onnxruntime"], run)

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> None:
        return None


# ---------------------------------------------------------------------------------------------------- float export

def export_float(exported: Any, example_inputs: tuple, options: LowerOptions) -> tuple[Any, int]:
    """(slimmed float ModelProto, node count before slimming): torch.onnx dynamo export, then onnxslim (constant
    folding, dead-node and redundant-op removal). Quantization starts from this graph, so it sees the same
    simplified ops the fp32 artifact has."""
    import onnxslim
    import torch

    onnx_program = torch.onnx.export(exported, example_inputs, dynamo=True, opset_version=OPSET,
                                     input_names=list(options.input_names),
                                     output_names=list(options.output_names), verbose=False)
    proto = onnx_program.model_proto
    return onnxslim.slim(proto), len(proto.graph.node)


def save(proto: Any, path: Path) -> bool:
    """Write and validate the model; weights go to model.onnx.data only past protobuf's 2 GB limit. True if so."""
    import onnx

    large = proto.ByteSize() >= INLINE_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)
    onnx.checker.check_model(str(path))
    return large


def op_census(proto: Any) -> dict[str, int]:
    """{op type: count} of the graph as written (for int8: QuantizeLinear/DequantizeLinear included)."""
    return dict(Counter(n.op_type for n in proto.graph.node))


# ---------------------------------------------------------------------------------------------------- quantization

def check_calibration(calibration: Any, example_inputs: tuple) -> np.ndarray:
    """The calibration batch as float32 N,C,H,W matching the export input; UsageError naming what is wrong."""
    if calibration is None:
        raise UsageError("int8 needs calibration data and none was given: pass --calib (images, digits or an .npz; "
                         "LowerOptions.calibration in the API), or export --quantize int8-dynamic, which needs none")
    x = np.asarray(calibration, dtype=np.float32)
    want = tuple(example_inputs[0].shape)
    if x.ndim != len(want) or x.shape[1:] != want[1:] or x.shape[0] == 0:
        raise UsageError(f"calibration data has shape {tuple(x.shape)} but the model takes (N, "
                         f"{', '.join(map(str, want[1:]))}); preprocess the calibration images to the export input")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argwhere(bad.reshape(x.shape[0], -1).any(1))[0, 0])
        raise UsageError(f"calibration data holds {int(bad.sum())} non-finite values (NaN/inf), first in sample "
                         f"{first}; int8 ranges would be meaningless - fix the calibration preprocessing")
    return x


def quantize(float_proto: Any, keep_float: dict[str, np.ndarray], calibration: np.ndarray | None,
             options: LowerOptions, work: Path) -> tuple[Any, dict[str, Any]]:
    """(quantized ModelProto, the details["quantization"] report) for options.precision int8 or int8-dynamic.

    `quant_pre_process` (symbolic + ONNX shape inference, onnxruntime's basic graph fusions) runs first, as
    onnxruntime recommends. On the exported graphs measured it changes no node (the exporter already fuses
    Conv+BatchNormalization, onnxslim folds constants) and costs 0.2-1.6 s; it is kept as insurance that every
    tensor has a known shape (one without is silently left unquantized) and that a graph slim left unfused still
    gets fused. float_layers are mapped to ONNX nodes on the preprocessed graph, the one that gets quantized."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    src, pre, out = work / "float.onnx", work / "pre.onnx", work / "quant.onnx"
    large = float_proto.ByteSize() >= INLINE_LIMIT
    onnx.save_model(float_proto, str(src), save_as_external_data=large)
    quant_pre_process(str(src), str(pre), save_as_external_data=large)
    excluded, unmatched = float_layer_nodes(onnx.load(str(pre)), keep_float)
    exclude = sorted({n for nodes in excluded.values() for n in nodes})
    if options.precision == "int8":
        assert calibration is not None
        quantize_int8(pre, out, calibration, exclude, work, large)
    else:
        quantize_int8_dynamic(pre, out, exclude, large)
    q = onnx.load(str(out))
    total = len(weight_layers(onnx.load(str(pre), load_external_data=False)))
    report = {"layers_total": total, "layers_quantized": total - len(weight_layers(q)),"scheme": SCHEMES[options.precision],
              "calibration_method": "MinMax" if options.precision == "int8" else None,
              "calibration_samples": int(calibration.shape[0]) if calibration is not None else 0,
              "nodes_quantized": count_quantized_nodes(q), "weights_int8": count_int8_weights(q),
              "float_layers": list(options.float_layers), "excluded_nodes": exclude,
              "excluded_by_layer": excluded, "unmatched_float_layers": unmatched}
    return q, report


def quantize_int8(model: Path, out: Path, calibration: np.ndarray, exclude: list[str], work: Path,
                  large: bool) -> None:
    """Static int8 in QDQ format: onnxruntime's CPU provider fuses each DequantizeLinear -> op -> QuantizeLinear
    group into QLinearConv / QLinearAdd / QGemm ... and runs it in integer arithmetic.

    Options, measured with onnxruntime 1.32 on an x86 Xeon with AVX512-VNNI (a shared 2-core VM), MobileNetV2 1.0
    (timm, folded) at 224x224, 1 thread, best of 60 runs: fp32 6.4 ms, and
    - activations QUInt8 asymmetric (U8S8): 3.4 ms, every conv a QLinearConv, Relu/Clip removed (their range is
      absorbed into the zero point). Chosen. onnxruntime's ARM64 kernels take uint8 activations with int8
      weights natively as well, so the one artifact is fast on x86 and ARM.
    - activations QInt8 asymmetric (S8S8): 5.6 ms; 15 of 52 convs stay float (no S8S8 depthwise QLinearConv on
      x86), with 32 layout Transposes around them.
    - activations QInt8 symmetric: 9.6 ms, slower than fp32; Clip can no longer be dropped, so every ReLU6 adds a
      Q/DQ round trip.
    - weights: int8, symmetric (zero point 0: the kernels skip the weight zero-point term), per output channel
      (depthwise and narrow convs have very different ranges per channel; one per-tensor scale crushes the small).
    - reduce_range=True (7-bit weights, [-64, 64]): x86 CPUs without VNNI (AVX2, AVX512 before Cascade Lake, AMD
      before Zen 4) multiply uint8 x int8 with vpmaddubsw, whose int16 pair sums saturate (255 * 127 * 2 > 32767).
      Emulating that on the quantized graphs with full-range weights changed 9.8 % of the conv outputs of the
      trained digits GhostNetV3 (worst error 28 % of the accumulator range) and 2.6 % of MobileNetV2's; with 7-bit
      weights 255 * 64 * 2 < 32767 cannot saturate. The cost, measured: logits SQNR 29.5 -> 29.2 dB and top-1
      unchanged (98.9 %) on the digits held-out split, no speed change (3.4 ms both). Parity is checked on the
      build machine, so the artifact must not depend on the CPU it later runs on.
    - calibration: MinMax over all calibration inputs. On the digits model (128 calibration images, 359 held-out):
      MinMax top-1 98.6-98.9 %, logits SQNR 30.4 dB; Percentile 99.999 %: 98.9 %, 30.7 dB (within noise); Entropy
      (KL, 2048 bins): 20.9 %, -0.4 dB (it clips the narrow sigmoid-gate and logit ranges away; with onnxruntime's
      default 128 bins it degenerates to MinMax). MinMax is deterministic, needs no histograms and is sound with
      the few dozen images a user may have, so it is the method.
    Result on that MobileNetV2: 3.7 ms vs 6.9 ms fp32 (1 thread, median of 60), 7.9 vs 15.0 ms with 2 threads
    (median, noisy on the shared VM); 3.6 vs 13.9 MB. Small 64x64 models gain size, not speed: the digits
    GhostNetV3 runs 1.67 vs 1.52 ms (per-op overhead and NHWC Transposes around its float Sigmoid/ReduceMean gates
    dominate). Random-init DeiT-tiny loses more (cosine 0.90 to fp32): use int8-dynamic for transformers.
    Ranges are computed here (not inside quantize_static) so that non-finite ones are caught and named, then handed
    to quantize_static through its calibration cache."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = calibrate(model, calibration, work)
    quantize_static(str(model), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    op_types_to_quantize=static_op_types(), use_external_data_format=large,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def quantize_int8_dynamic(model: Path, out: Path, exclude: list[str], large: bool) -> None:
    """Dynamic int8: weights stored int8 (symmetric, per channel, 7-bit range for the same vpmaddubsw reason as
    int8), activations quantized to uint8 at run time from each tensor's own min/max; no calibration.

    Only MatMul and Gemm (Linear layers) are quantized. onnxruntime's dynamic Conv is DynamicQuantizeLinear ->
    ConvInteger -> Cast -> Mul around every conv, measured on MobileNetV2 at 224x224 (1 thread, best of 60): 74 ms
    against 6.4 ms fp32, 12x slower. With MatMul/Gemm only it runs at fp32 speed (6.5 vs 6.9 ms median) and shrinks
    only the Linear layers (13.9 -> 10.1 MB: the classifier). Its use is transformers, whose weights are nearly all
    MatMul: DeiT-tiny 23.7 -> 15.1 ms, 22.8 -> 6.5 MB, cosine 0.999 to fp32. For CNNs use int8.
    A Gemm is rewritten to MatMul (+Add) named '<gemm>_MatMul' before quantizing, so exclusions name both."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = sorted({*exclude, *(f"{n}_MatMul" for n in exclude)})
    quantize_dynamic(str(model), str(out), op_types_to_quantize=list(DYNAMIC_OP_TYPES), per_channel=True,
                     reduce_range=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                     use_external_data_format=large, extra_options={"WeightSymmetric": True})


def static_op_types() -> list[str]:
    """Every op type onnxruntime can quantize statically (its own default); the calibrator must record the ranges
    of exactly the tensors the quantizer will ask for."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


class CalibrationBatches:
    """onnxruntime CalibrationDataReader over an N,C,H,W array, in batches of the exported (static) batch size; a
    short last batch is filled with its own first sample (a repeat does not move a min/max range)."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int) -> None:
        self.input_name, self.data, self.batch, self.i = input_name, data, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.data.shape[0]:
            return None
        chunk = self.data[self.i:self.i + self.batch]
        self.i += self.batch
        if chunk.shape[0] < self.batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - chunk.shape[0], axis=0)])
        return {self.input_name: np.ascontiguousarray(chunk)}


def calibrate(model: Path, calibration: np.ndarray, work: Path) -> Path:
    """MinMax ranges of every quantizable tensor over the calibration data, checked finite, written as an
    onnxruntime calibration cache (JSON) that quantize_static reads instead of calibrating again."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    graph_input = onnx.load(str(model), load_external_data=False).graph.input[0]
    batch = graph_input.type.tensor_type.shape.dim[0].dim_value or 1
    calibrator = create_calibrator(model, static_op_types(), augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(CalibrationBatches(graph_input.name, calibration, batch))
    ranges = calibrator.compute_data()
    del calibrator   # closes its session on the augmented model
    check_ranges(ranges)
    cache = work / "calibration.json"
    save_tensors_data(ranges, cache)
    return cache


def check_ranges(ranges: Any) -> None:
    """EffaiError naming the tensors whose calibrated range is NaN or infinite (the float model overflows, or
    produces NaN, on the calibration data): their scale would be NaN and the int8 model garbage."""
    bad = []
    for name, data in ranges.items():
        lo, hi = data.range_value if hasattr(data, "range_value") else data
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            bad.append(f"{name} [{np.asarray(lo).min():g}, {np.asarray(hi).max():g}]")
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise EffaiError(f"int8 calibration gave non-finite (NaN/inf) ranges for {len(bad)} tensors: {shown}; the "
                         "float model overflows or makes NaN on the calibration data - check its preprocessing")


# ---------------------------------------------------------------------------------------------------- float_layers

def float_layer_weights(exported: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """{torch layer: its weight} for LowerOptions.float_layers; UsageError naming an unknown layer and the
    layers there are (checked before the export, so a typo fails fast)."""
    names = list(names)
    if not names:
        return {}
    from effai.export.layer_map import layer_weights

    state = exported.state_dict() if callable(getattr(exported, "state_dict", None)) else exported.state_dict
    layers = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim >= 2]
    for n in names:
        if n not in layers:
            raise UsageError(f"--float-layers: '{n}' is not a Conv/Linear layer of the model; "
                             f"{choices_hint(n, layers)}")
    return layer_weights(exported, names)


def float_layer_nodes(model: Any, wanted: dict[str, np.ndarray]) -> tuple[dict[str, list[str]], list[str]]:
    """({torch layer: [ONNX nodes using its weight]}, [layers not found]) for LowerOptions.float_layers.

    The exporter renames everything but keeps each weight's values: the float graph's initializers are matched
    against the torch weights by content (effai.export.layer_map; layout-invariant), and the nodes consuming a
    matched initializer (through Transpose/Reshape/... of it, if any) are the layer's nodes. A layer whose weight
    was folded into another (or is not in the graph) is reported as unmatched rather than silently ignored."""
    if not wanted:
        return {}, []
    from onnx import TensorProto, numpy_helper

    from effai.export.layer_map import match

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
    candidates = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type in floats}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found, unmatched = {}, []
    for layer, keys in match(wanted, candidates).items():
        nodes = sorted({n for k in keys for n in _users(k, consumers)})
        if nodes:
            found[layer] = nodes
        else:
            unmatched.append(layer)
    return found, unmatched


def _users(tensor: str, consumers: dict[str, list[Any]]) -> set[str]:
    """Names of the compute nodes that use `tensor`, looking through ops that only re-layout it."""
    out: set[str] = set()
    for node in consumers.get(tensor, []):
        if node.op_type in PASS_THROUGH_OPS and node.input and node.input[0] == tensor:
            out |= {u for o in node.output for u in _users(o, consumers)}
        else:
            out.add(node.name)
    return out


# ---------------------------------------------------------------------------------------------------- reporting

def count_quantized_nodes(proto: Any) -> int:
    """Nodes that run on quantized data: integer ops (dynamic: MatMulInteger, ConvInteger ...) and, in QDQ, every
    other op fed by a DequantizeLinear (onnxruntime fuses those groups into QLinear kernels)."""
    dq_outputs = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in proto.graph.node
               if n.op_type in INTEGER_OPS
               or (n.op_type not in QDQ_OPS and any(i in dq_outputs for i in n.input)))


def weight_layers(proto: Any) -> list[str]:
    """Float Conv/ConvTranspose/Gemm/MatMul nodes whose weight is an initializer (the model's Conv/Linear layers);
    a quantized layer becomes an integer op (MatMulInteger, QLinearConv ...) and is no longer listed."""
    inits = {i.name for i in proto.graph.initializer}
    consts = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts)]


def count_int8_weights(proto: Any) -> int:
    """Weight tensors stored as 8-bit integers (rank >= 2: biases and zero points are not counted)."""
    from onnx import TensorProto

    return sum(1 for i in proto.graph.initializer
               if i.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(i.dims) >= 2)


def _spec(value_info: Any, layout: str | None) -> TensorSpec:
    import onnx

    t = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorSpec(value_info.name, shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      layout or layout_for(shape))


# ------------------------------------------------------------------------------------------------------- ONNX

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
        v.doc_string = output_text(info, len(proto.graph.output))
    atomic_write(path, proto.SerializeToString(deterministic=True))
    return {"format": "onnx metadata_props", "fields": sorted(fields), "labels": "embedded" if info.labels else "none",
            "also": ["doc_string", "producer_name", "producer_version", "graph input/output doc_string"],
            "read_with": "onnx.load(path).metadata_props; onnxruntime InferenceSession.get_modelmeta()"
                         ".custom_metadata_map"}


TARGETS.register("onnx", OnnxTarget())
