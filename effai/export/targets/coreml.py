"""Core ML target: torch.jit.trace -> coremltools -> .mlpackage (ML program), float or compressed.

The Core ML runtime exists only on macOS: there parity runs predictions; on Linux the package is verified
structurally and parity says so. Compressed precisions: coremltools.optimize.coreml on the fp16-compute program;
int8 (W8A8) takes its activation ranges from `MilEvaluator` (the program evaluated op by op in torch), so it exports
on Linux too. Calls, saved ops, deployment targets: docs/quantization.md, "effai/export/targets/coreml.py".
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from effai.errors import EffaiError, UsageError
from effai.export.coreml_mil import MilEvaluator, NeedsRuntime
from effai.export.metadata import CLASS_LABEL, CLASS_SCORES, ModelInfo, output_text
from effai.files import atomic_write
from effai.export.quiet import import_quietly
from effai.export.targets.base import (TARGETS, LayerRule, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)

MIN_TARGET = "iOS16"   # ML programs with fp16 compute need iOS 15+; iOS 16 adds the ops modern nets use
# quantize/dequantize (activation quantization) are iOS17 ops; int4 weights (constexpr_blockwise_shift_scale) iOS18
MIN_TARGETS = {"int8": "iOS17", "int4-weight": "iOS18"}
INT4_BLOCK = 32        # int4 per-block: 32 input channels share a scale (Apple's recommended block for int4)
WEIGHT_THRESHOLD = 2048  # coremltools' default: weights with fewer elements stay fp16 (too small to be worth it)
QUANTIZED_WEIGHT_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


class CoreMLTarget:
    name = "coreml"
    description = "Core ML .mlpackage (ML program) for iOS/macOS (CPU, GPU, Neural Engine)"
    precisions = ("fp16", "fp32", "int8", "int8-weight", "int4-weight", "palette4", "palette6", "palette8")
    needs_exported_program = False
    unsupported: dict[str, str] = {}
    # coremltools compresses a weight only when it has more than weight_threshold elements; W8A8 (int8) quantizes
    # every layer's activations, so all layers count there.
    quantizes = {p: LayerRule(min_weights=WEIGHT_THRESHOLD + 1)
                 for p in ("int8-weight", "int4-weight", "palette4", "palette6", "palette8")}

    def available(self) -> tuple[bool, str]:
        return require(("coremltools", "coremltools"), extra="coreml")

    def lower(self, model: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        ct: Any = import_quietly("coremltools")
        import torch

        precision = options.precision
        min_target = MIN_TARGETS.get(precision, MIN_TARGET)
        samples = _calibration_batches(options, example_inputs) if precision == "int8" else None
        _patch_int_cast_for_numpy2()
        with torch.no_grad():
            traced = torch.jit.trace(model.eval(), example_inputs)
        compute = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16  # compressed: fp16 compute
        mlmodel = ct.convert(
            traced,
            # fp32 I/O even for fp16 compute: apps feed float MLMultiArrays, Core ML casts at the boundary
            inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32)
                    for n, x in zip(options.input_names, example_inputs)],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in options.output_names],
            convert_to="mlprogram",
            compute_precision=compute,
            minimum_deployment_target=getattr(ct.target, min_target),
        )
        quantization = None
        if precision not in ("fp16", "fp32"):
            mlmodel, quantization = compress(mlmodel, model, options, samples)
            quantization["minimum_deployment_target"] = min_target
        path = out_dir / "model.mlpackage"
        mlmodel.save(str(path))
        summary = spec_summary(path)
        details: dict[str, Any] = {"minimum_deployment_target": min_target,
                                   "compute_precision": "fp32" if precision == "fp32" else "fp16", "spec": summary}
        if quantization is not None:
            details["quantization"] = quantization
        return Lowered(
            model_file=path.name,
            inputs=[TensorSpec(i["name"], tuple(i["shape"]), i["dtype"], "NCHW") for i in summary["inputs"]],
            outputs=[TensorSpec(o["name"], tuple(o["shape"]), o["dtype"], layout_for(tuple(o["shape"])))
                     for o in summary["outputs"]],
            details=details,
        )

    metadata_modifies_model = True             # False: nothing to check before/after embedding

    def write_metadata(self, root: Path, lowered: Lowered, info: ModelInfo) -> dict[str, Any]:
        """The model's description in the model file, this format's native way (effai.export.metadata)."""
        return write_coreml(root, lowered, info)

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        if platform.system() != "Darwin":
            return "Core ML runtime needs macOS"
        ct: Any = import_quietly("coremltools")

        mlmodel = ct.models.MLModel(str(out_dir / lowered.model_file), compute_units=ct.ComputeUnit.CPU_ONLY)
        in_names = [i.name for i in lowered.inputs]
        out_names = [o.name for o in lowered.outputs]

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            res = mlmodel.predict(dict(zip(in_names, inputs)))
            return [np.asarray(res[n], dtype=np.float32) for n in out_names]

        return Predictor("coreml-cpu", package_versions("coremltools")["coremltools"], run)

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> dict[str, Any]:
        """Re-read the saved package and compare it with what the export asked for."""
        s = spec_summary(out_dir / lowered.model_file)
        problems = []
        want_in = [tuple(x) for x in expected["input_shapes"]]
        got_in = [tuple(i["shape"]) for i in s["inputs"]]
        if got_in != want_in:
            problems.append(f"input shapes {got_in} != {want_in}")
        want_out = [tuple(x) for x in expected["output_shapes"]]
        got_out = [tuple(o["shape"]) for o in s["outputs"]]
        if got_out != want_out:
            problems.append(f"output shapes {got_out} != {want_out}")
        if s["op_count"] == 0:
            problems.append("the program has no operations")
        problems += precision_problems(expected["precision"], s, lowered.details.get("quantization"))
        return {"status": "fail" if problems else "pass", "problems": problems, **s}


def precision_problems(precision: str, s: dict[str, Any], quantization: dict[str, Any] | None) -> list[str]:
    """What the saved program should hold at `precision` (from spec_summary), as a list of problems.

    fp16/fp32: float consts of that type. Compressed precisions keep fp16 compute, so no fp32 weight is left, and
    each compressed weight is one constexpr op decompressing its payload when the model loads: int8/int4 affine
    (constexpr_affine_dequantize up to iOS17, constexpr_blockwise_shift_scale from iOS18) or a 2^K-entry LUT
    (constexpr_lut_to_dense); W8A8 adds quantize/dequantize pairs on activations."""
    if precision in ("fp16", "fp32"):
        if precision in s["weight_dtypes"]:
            return []
        return [f"weights are {sorted(s['weight_dtypes'])}, expected {precision}"]
    c = s["compressed_weights"]
    problems = []
    if "fp32" in s["weight_dtypes"]:
        problems.append(f"fp32 weights left in a {precision} package (compressed variants compute in fp16)")
    if precision in ("int8", "int8-weight", "int4-weight"):
        bits = "int4" if precision == "int4-weight" else "int8"
        ops = ("constexpr_blockwise_shift_scale",) if bits == "int4" else QUANTIZED_WEIGHT_OPS
        n = sum(c["ops"].get(o, 0) for o in ops)
        if n == 0 or bits not in c["data_dtypes"]:
            problems.append(f"no {bits} weights ({' / '.join(ops)}) in the package; compressed: {c}")
    elif precision.startswith("palette"):
        entries = 2 ** int(precision[len("palette"):])
        if not c["ops"].get("constexpr_lut_to_dense") or set(c["lut_entries"]) != {entries}:
            problems.append(f"expected constexpr_lut_to_dense with {entries}-entry LUTs; compressed: {c}")
    if precision == "int8" and not (s["ops"].get("quantize") and s["ops"].get("dequantize")):
        problems.append("no quantize/dequantize ops on activations in an int8 (W8A8) package")
    if quantization and quantization.get("layers_quantized") not in (None, c["count"]):
        problems.append(f"{c['count']} compressed weights in the package, the export reported "
                        f"{quantization['layers_quantized']}")
    return problems


SCHEMES = {
    "int8-weight": "int8 weights, per-channel symmetric (linear_quantize_weights); fp16 activations",
    "int4-weight": f"int4 weights, symmetric, per block of {INT4_BLOCK} input channels (per output channel where "
                   f"those do not divide by {INT4_BLOCK}) (linear_quantize_weights); fp16 activations",
    "palette4": "4-bit palettized weights: one 16-entry k-means LUT per tensor (palettize_weights); fp16 activations",
    "palette6": "6-bit palettized weights: one 64-entry k-means LUT per tensor (palettize_weights); fp16 activations",
    "palette8": "8-bit palettized weights: one 256-entry k-means LUT per tensor (palettize_weights); fp16 activations",
    "int8": "W8A8: int8 activations, symmetric per tensor, calibrated (linear_quantize_activations), and int8 "
            "weights, per-channel symmetric (linear_quantize_weights)",
}


def compress(mlmodel: Any, model: Any, options: LowerOptions,
             batches: list[np.ndarray] | None) -> tuple[Any, dict[str, Any]]:
    """The fp16 ML program compressed to options.precision, with options.float_layers left in float; and the
    details["quantization"] record of what was done."""
    import_quietly("coremltools")
    import coremltools.optimize.coreml as cto

    precision = options.precision
    kept, unmatched, consumers = float_layer_consts(mlmodel, model, options.float_layers)
    skip = {const: None for consts in kept.values() for const in consts}   # None: leave this const uncompressed
    info: dict[str, Any] = {"scheme": SCHEMES[precision], "float_layers": list(options.float_layers),
                            "unmatched_float_layers": unmatched, "float_layer_weights": kept}
    if precision == "int8":
        assert batches is not None
        mlmodel, info["calibration"] = quantize_activations(mlmodel, model, batches, options.input_names[0], consumers)
    configs = weight_configs(precision)
    for i, config in enumerate(configs):
        compress_weights = (cto.palettize_weights if isinstance(config, cto.OpPalettizerConfig)
                            else cto.linear_quantize_weights)
        # a pass followed by another warns of every weight it leaves to that one ("Skipped this op"): mute it
        with _quiet_coremltools() if i < len(configs) - 1 else contextlib.nullcontext():
            mlmodel = compress_weights(mlmodel, cto.OptimizationConfig(global_config=config, op_name_configs=skip))
    census = summarize_spec(mlmodel.get_spec())
    info["layers_quantized"] = census["compressed_weights"]["count"]
    if precision == "int8":
        info["activations_quantized"] = census["ops"].get("quantize", 0)
    return mlmodel, info


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """coremltools' logger ("coremltools") at ERROR for the block."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def weight_configs(precision: str) -> list[Any]:
    """coremltools OpCompressorConfigs applied in turn to the weights at `precision`.

    OpLinearQuantizerConfig(mode="linear_symmetric") stores w ~ scale * q (zero point 0) with q int8/int4; per_channel
    gives each output channel a scale, per_block one per `block_size` input channels of each output channel (and
    skips weights whose input channels do not divide by it: the second, per-channel int4 pass takes those).
    OpPalettizerConfig(mode="kmeans", nbits=k, granularity="per_tensor") clusters each weight into 2^k values and
    stores k-bit indices into that lookup table."""
    import_quietly("coremltools")
    import coremltools.optimize.coreml as cto

    if precision in ("int8", "int8-weight"):
        return [cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                            weight_threshold=WEIGHT_THRESHOLD)]
    if precision == "int4-weight":
        return [cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                            block_size=INT4_BLOCK, weight_threshold=WEIGHT_THRESHOLD),
                cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_channel",
                                            weight_threshold=WEIGHT_THRESHOLD)]
    if precision.startswith("palette"):
        return [cto.OpPalettizerConfig(mode="kmeans", nbits=int(precision[len("palette"):]), granularity="per_tensor",
                                       weight_threshold=WEIGHT_THRESHOLD)]
    return []


def float_layer_consts(mlmodel: Any, model: Any,
                       names: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """({torch layer: [Core ML const ops holding its weight]}, [layers found in no const], [ops consuming them]).

    coremltools.optimize.coreml.get_weights_metadata lists every const of the program with its values and consumer
    ops; effai.export.layer_map matches them to the torch weights by content, before any compression. fp16
    conversion rounds each weight by up to 2^-11 relative, well inside rtol 2e-3."""
    if not names:
        return {}, [], []
    import_quietly("coremltools")
    import coremltools.optimize.coreml as cto

    from effai.export.layer_map import layer_weights, match

    meta = cto.get_weights_metadata(mlmodel, weight_threshold=1)
    candidates = {k: m.val for k, m in meta.items()
                  if isinstance(m.val, np.ndarray) and m.val.dtype.kind == "f" and m.val.ndim >= 2}
    found = match(layer_weights(model, names), candidates, rtol=2e-3, atol=1e-6)
    kept = {n: sorted(c) for n, c in found.items() if c}
    consumers = sorted({op.name for consts in kept.values() for c in consts for op in meta[c].child_ops})
    return kept, [n for n in names if not found.get(n)], consumers


def _calibration_batches(options: LowerOptions, example_inputs: tuple) -> list[np.ndarray]:
    """options.calibration cut into batches of the model's input shape; UsageError when missing or mis-shaped."""
    if options.calibration is None:
        raise UsageError("Core ML int8 (W8A8) needs calibration images to measure activation ranges; pass --calib "
                         "DIR, or export int8-weight, which needs none")
    if len(example_inputs) != 1:
        raise UsageError(f"int8 calibration feeds one input; this model takes {len(example_inputs)}: export "
                         "int8-weight instead")
    shape = tuple(example_inputs[0].shape)
    cal = np.asarray(options.calibration, dtype=np.float32)
    if cal.ndim != len(shape) or cal.shape[1:] != shape[1:] or cal.shape[0] < shape[0]:
        raise UsageError(f"calibration data has shape {cal.shape}; the model takes batches of {shape}: preprocess "
                         "the calibration images at the export input size")
    return [cal[i:i + shape[0]] for i in range(0, cal.shape[0] - shape[0] + 1, shape[0])]


def quantize_activations(mlmodel: Any, model: Any, batches: list[np.ndarray], input_name: str,
                         float_ops: list[str]) -> tuple[Any, dict[str, Any]]:
    """W8A8 step 1, coremltools.optimize.coreml.linear_quantize_activations: int8 quantize/dequantize pairs
    (symmetric, one scale per tensor, from each tensor's calibrated [min, max]) before and after the conv, linear,
    pooling and add ops, except `float_ops`.

    coremltools calibrates with MLModel.predict, which needs the Core ML runtime (macOS). effai evaluates the
    program with torch instead (`activation_ranges`) and hands coremltools those ranges; on macOS, a program the
    evaluator cannot run falls back to coremltools' own calibration."""
    import_quietly("coremltools")
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"),
                                    op_name_configs={op: None for op in float_ops})
    samples = [{input_name: b} for b in batches]
    try:
        ranges, check = activation_ranges(mlmodel, model, batches)
    except NeedsRuntime as e:
        if platform.system() != "Darwin":
            raise EffaiError(f"Core ML int8 (W8A8) calibration needs macOS for this model: {e}; export int8 on a "
                             "Mac, or int8-weight (no calibration) here") from None
        return cto.linear_quantize_activations(mlmodel, config, samples), {
            "method": "Core ML runtime (coremltools MLModel.predict)", "samples": int(sum(len(b) for b in batches)),
            "evaluator_unusable": str(e)}
    with _calibration_ranges(ranges):
        quantized = cto.linear_quantize_activations(mlmodel, config, samples)
    return quantized, {"method": "effai ML-program evaluator (torch, CPU), checked against the torch model",
                       "samples": int(sum(len(b) for b in batches)), "evaluator_vs_torch": check}


@contextlib.contextmanager
def _calibration_ranges(ranges: dict[str, dict[str, float]]) -> Iterator[None]:
    """Within the block, coremltools' linear_quantize_activations takes `ranges` instead of measuring them: its
    `_get_activation_calibration_stats(mlmodel, sample_data, group_size)` (coremltools 9) is what calls
    MLModel.predict; everything after it (coremltools' quantize/dequantize insertion passes) runs unchanged."""
    coremltools: Any = import_quietly("coremltools")
    from coremltools.optimize.coreml import _post_training_quantization as ptq

    original = getattr(ptq, "_get_activation_calibration_stats", None)
    if original is None:   # a private hook: fail clearly if coremltools moves it
        raise EffaiError(f"coremltools {coremltools.__version__} no longer has the calibration hook effai's Core ML "
                         "int8 (W8A8) uses off macOS; install coremltools 9.x (constraints.txt) or export int8-weight")
    ptq._get_activation_calibration_stats = lambda *args, **kwargs: ranges
    try:
        yield
    finally:
        ptq._get_activation_calibration_stats = original


def activation_ranges(mlmodel: Any, model: Any,
                      batches: list[np.ndarray]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({tensor name: {"rmin", "rmax"}} over every calibration batch, the evaluator-vs-torch metrics).

    The format of coremltools' calibration stats; unlike coremltools 9's own calibration, which keeps only the last
    sample's range, ranges accumulate over all samples. Raises NeedsRuntime when the program has an op the
    evaluator lacks, or its outputs stray from the torch model's beyond the fp16 parity tolerance."""
    import torch

    from effai.export.fold import flat_outputs
    from effai.export.parity import TOLERANCES, compare

    program = getattr(mlmodel, "_mil_program", None)
    if program is None or "main" not in program.functions:
        raise NeedsRuntime("coremltools kept no in-memory ML program to evaluate")
    fn = program.functions["main"]
    evaluator = MilEvaluator(fn)
    ranges: dict[str, dict[str, float]] = {}
    got, want = [], []
    for batch in batches:
        env = evaluator.run({name: batch for name in fn.inputs})
        for name, t in env.items():
            if t.is_floating_point() and t.numel():
                lo, hi = float(t.min()), float(t.max())
                r = ranges.setdefault(name, {"rmin": lo, "rmax": hi})
                r["rmin"], r["rmax"] = min(r["rmin"], lo), max(r["rmax"], hi)
        got.append([env[v.name].numpy() for v in fn.outputs])
        with torch.no_grad():
            want.append([t.float().numpy() for t in flat_outputs(model(torch.from_numpy(batch)))])
    check = compare([np.concatenate(w) for w in zip(*want)], [np.concatenate(g) for g in zip(*got)],
                    TOLERANCES["fp16"])
    if check["status"] != "pass":
        raise NeedsRuntime(f"effai's evaluation of the Core ML program disagrees with torch ({check['reason']})")
    _share_concat_ranges(fn, ranges)
    return ranges, {"rel_err": check["rel_err"], "cosine": check["cosine"]}


def _share_concat_ranges(fn: Any, ranges: dict[str, dict[str, float]]) -> None:
    """As coremltools' calibration does: the inputs and output of a concat share one range (so one scale and a
    quantized concat needs no requantization); concats sharing a tensor merge into one group."""
    groups: list[set[str]] = []
    for op in fn.operations:
        if op.op_type != "concat":
            continue
        group = ({v.name for v in op.inputs["values"]} | {op.outputs[0].name}) & ranges.keys()
        for g in [g for g in groups if g & group]:
            groups.remove(g)
            group |= g
        if group:
            groups.append(group)
    for group in groups:
        lo, hi = min(ranges[n]["rmin"] for n in group), max(ranges[n]["rmax"] for n in group)
        for n in group:
            ranges[n] = {"rmin": lo, "rmax": hi}


def _patch_int_cast_for_numpy2() -> None:
    """coremltools 9.0 folds torch's aten::Int of a constant 1-element tensor with `int(array)`, which numpy 2
    refuses ("only 0-dimensional arrays can be converted to Python scalars"); ViTs (DeiT) hit it. Fold it with
    .item() instead; every other case goes to the original converter."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    original = ops._cast
    if getattr(original, "_effai_patched", False):
        return

    def cast(context: Any, node: Any, dtype: type, dtype_name: str) -> None:
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.ndim(x.val) > 0 and np.size(x.val) == 1:
            context.add(mb.const(val=dtype(np.asarray(x.val).reshape(()).item()), name=node.name), node.name)
            return
        original(context, node, dtype, dtype_name)

    cast._effai_patched = True  # type: ignore[attr-defined]
    ops._cast = cast


_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 131080: "int8"}  # ArrayFeatureType.ArrayDataType
_MIL_DTYPES = {"FLOAT32": "fp32", "FLOAT16": "fp16", "INT8": "int8", "UINT8": "uint8", "INT4": "int4",
               "INT32": "int32", "UINT4": "uint4", "BOOL": "bool", "STRING": "string", "INT16": "int16",
               "UINT1": "uint1", "UINT2": "uint2", "UINT3": "uint3", "UINT6": "uint6", "UINT16": "uint16"}
_PAYLOADS = ("quantized_data", "data", "indices")   # the stored tensor of constexpr_affine_dequantize /
#                                                     constexpr_blockwise_shift_scale / constexpr_lut_to_dense


def spec_summary(path: Path) -> dict[str, Any]:
    """Inputs, outputs, op census, the dtypes of const tensors (weights), the compressed weights and the size of the
    weight blob (weights/weight.bin) of a saved .mlpackage."""
    ct: Any = import_quietly("coremltools")

    weights = path / "Data" / "com.apple.CoreML" / "weights"
    size = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
    return {**summarize_spec(ct.utils.load_spec(str(path))), "weights_bytes": size}


def summarize_spec(spec: Any) -> dict[str, Any]:
    """spec_summary's content from a Model spec (a saved package's or an in-memory MLModel's get_spec()).

    compressed_weights: each constexpr_* op is one compressed weight, decompressed when the model loads; its
    payload's stored dtype (int8, int4, or the LUT indices' packed uint8 / uintK) and, for LUTs, their entry count."""
    from coremltools.proto import MIL_pb2

    def feat(f: Any) -> dict[str, Any]:
        arr = f.type.multiArrayType
        return {"name": f.name, "shape": [int(d) for d in arr.shape], "dtype": _DTYPES.get(arr.dataType, str(arr.dataType))}

    dtype_names = {v: k for k, v in MIL_pb2.DataType.items()}

    def dtype(t: Any) -> str:
        return _MIL_DTYPES.get(dtype_names.get(t.dataType, ""), str(t.dataType))

    ops: dict[str, int] = {}
    weight_dtypes: dict[str, int] = {}
    compressed: dict[str, Any] = {"count": 0, "ops": {}, "data_dtypes": {}, "lut_entries": []}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
                if op.type == "const":
                    for out in op.outputs:
                        t = out.type.tensorType
                        if len(t.dimensions) >= 1 and _numel(t) > 16:  # weights, not scalars or shape vectors
                            weight_dtypes[dtype(t)] = weight_dtypes.get(dtype(t), 0) + 1
                elif op.type.startswith("constexpr_"):
                    compressed["count"] += 1
                    compressed["ops"][op.type] = compressed["ops"].get(op.type, 0) + 1
                    for key, t in _tensor_params(op):
                        if key in _PAYLOADS:
                            compressed["data_dtypes"][dtype(t)] = compressed["data_dtypes"].get(dtype(t), 0) + 1
                        elif key == "lut":   # iOS16: [entries]; iOS18: [..., entries, vector size]
                            dims = [int(d.constant.size) for d in t.dimensions]
                            compressed["lut_entries"].append(dims[-2] if len(dims) > 1 else dims[0])
    compressed["lut_entries"] = sorted(set(compressed["lut_entries"]))
    # tensor outputs only: a classifier's label (string) and {label: score} (dictionary) outputs (the metadata stage
    # adds them, keeping the scores tensor) are named in "classifier"
    tensors = [f for f in spec.description.output if f.type.WhichOneof("Type") == "multiArrayType"]
    d = spec.description
    classifier = ({"label": d.predictedFeatureName, "scores": d.predictedProbabilitiesName}
                  if d.predictedFeatureName else None)
    return {"inputs": [feat(f) for f in d.input], "outputs": [feat(f) for f in tensors], "classifier": classifier,
            "spec_version": spec.specificationVersion, "op_count": sum(ops.values()), "ops": ops,
            "weight_dtypes": weight_dtypes, "compressed_weights": compressed}


def _tensor_params(op: Any) -> Iterator[tuple[str, Any]]:
    """(name, TensorType) of an op's tensor-valued parameters: attributes (iOS16 constexpr ops) and inline input
    values (iOS18 constexpr ops)."""
    for key, value in op.attributes.items():
        if value.type.WhichOneof("type") == "tensorType":
            yield key, value.type.tensorType
    for key, arg in op.inputs.items():
        for a in arg.arguments:
            if a.HasField("value") and a.value.type.WhichOneof("type") == "tensorType":
                yield key, a.value.type.tensorType


def _numel(t: Any) -> int:
    n = 1
    for d in t.dimensions:
        n *= int(d.constant.size) if d.HasField("constant") else 1
    return n


# ----------------------------------------------------------------------------------------------------- Core ML

def write_coreml(root: Path, lowered: Any, info: ModelInfo) -> dict[str, Any]:
    """spec.description.metadata and feature descriptions; a classifier (coremltools' `classify` op over the
    logits, which stay an output) when the model has one (1, num_classes) float32 output. Only the package's spec
    file (model.mlmodel) is rewritten: weights and Manifest.json stay as coremltools wrote them."""
    ct: Any = import_quietly("coremltools")

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
        feature.shortDescription = output_text(info, len(tensors))
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
    ct: Any = import_quietly("coremltools")
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


TARGETS.register("coreml", CoreMLTarget())
