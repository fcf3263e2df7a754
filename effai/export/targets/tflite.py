"""TFLite target: litert-torch -> .tflite, run by the ai-edge-litert Interpreter (tflite_runtime as a fallback).

Quantized precisions are applied to the float .tflite by ai-edge-quantizer (litert-torch's own PT2E int8 path
fails on GhostNetV3: 'tfl.pad' same-scale constraint):
- int8: full-integer static (`static_wi8_ai8`: per-channel int8 weights, int8 activations from min/max on --calib
  data). Input/output stay float32 (a QUANTIZE/DEQUANTIZE at the edges) unless `--io-dtype int8`, which makes them
  int8 with the scale/zero-point recorded in the manifest (microcontrollers, Edge TPU).
- int8-dynamic: `dynamic_wi8_afp32` (int8 weights, activations quantized per run by the kernels).
- int8-weight / int4-weight: `weight_only_wi8_afp32` / `weight_only_wi4_afp32` (weights dequantized, float compute).
- fp16: float16 weights (float casting), dequantized to float32 at load (the GPU delegate computes in fp16).
Layers in LowerOptions.float_layers are found by weight content (effai/export/layer_map.py) and their ops get
`no_quantize` in the recipe.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

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

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
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


TARGETS.register("tflite", TFLiteTarget())
