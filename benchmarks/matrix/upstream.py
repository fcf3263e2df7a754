"""Each toolchain's own documented flow on the unfolded model (see export_matrix.py's docstring). Each writes the
artifact to `path` and returns extra details; raises NotApplicable or the toolchain's error."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effai.export.quiet import captured
from matrix.case import Case, NotApplicable, _delegation_short, _first_line, _mb


def upstream_executorch(case: Case, precision: str, path: Path) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from effai.export.targets.executorch import delegation_summary

    x = (torch.from_numpy(case.x),)
    ep = torch.export.export(case.model, x)
    if precision in ("int8", "int8-dynamic"):
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                              get_symmetric_quantization_config)

        dynamic = precision == "int8-dynamic"
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                     is_dynamic=dynamic))
        ep = torch.export.export(_pt2e(ep.module(), quantizer, case.x if dynamic else case.calib), x)
    elif precision in ("int8-weight", "int4-weight"):
        ep = _torchao_weight_only(case, precision)
    elif precision != "fp32":
        raise NotApplicable(f"no XNNPACK flow for {precision}")
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    delegation = delegation_summary(edge.exported_program().graph_module)
    path.write_bytes(edge.to_executorch().buffer)
    return {"delegation": _delegation_short(delegation)}


def _torchao_weight_only(case: Case, precision: str) -> Any:
    """torchao's documented weight-only flow for ExecuTorch: quantize_(IntxWeightOnlyConfig, per output channel),
    then torch.export (XNNPACKQuantizer has no weight-only config)."""
    import copy

    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    model = copy.deepcopy(case.model)
    dtype = torch.int8 if precision == "int8-weight" else torch.int4
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0)))
    return torch.export.export(model, (torch.from_numpy(case.x),))


def _pt2e(module: torch.nn.Module, quantizer: Any, calib: np.ndarray, **convert_kwargs: Any) -> Any:
    """prepare_pt2e -> run `calib` one sample at a time -> convert_pt2e. Dynamic quantization gets the example
    input once, as the docs do: the per-channel weight observers only see the weights during a forward."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for i in range(calib.shape[0]):
            prepared(torch.from_numpy(calib[i:i + 1]))
    return convert_pt2e(prepared, **convert_kwargs)


AEQ_RECIPES = {"int8": "static_wi8_ai8", "int8-dynamic": "dynamic_wi8_afp32",
               "int8-weight": "weight_only_wi8_afp32", "int4-weight": "weight_only_wi4_afp32"}


def upstream_tflite(case: Case, precision: str, path: Path) -> dict[str, Any]:
    import litert_torch

    def convert(p: Path) -> None:
        litert_torch.convert(case.model, (torch.from_numpy(case.x),)).export(str(p))

    if precision == "fp32":
        convert(path)
        return {}
    if precision not in AEQ_RECIPES:
        raise NotApplicable(f"ai-edge-quantizer has no preset recipe for {precision}")
    extra = {"recipe": AEQ_RECIPES[precision]}
    if precision == "int8":
        extra["litert_torch_pt2e"] = _tflite_pt2e(case, path.with_name("model.pt2e.tflite"))
    float_path, float_s = case.float_artifact("tflite-fp32", convert, path.with_name("model.float.tflite"))
    t0 = time.perf_counter()
    extra["io_dtype"] = _aeq_quantize(case, float_path, precision, path)
    extra["float_s"], extra["quantize_s"] = round(float_s, 3), round(time.perf_counter() - t0, 3)
    return extra


def _tflite_pt2e(case: Case, path: Path) -> dict[str, Any]:
    """litert-torch's documented PT2E int8 path (PT2EQuantizer, per-channel, static); its outcome, not raised."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    x = (torch.from_numpy(case.x),)
    t0 = time.perf_counter()
    try:
        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                  is_dynamic=False))
        module = _pt2e(torch.export.export(case.model, x).module(), quantizer, case.calib, fold_quantize=False)
        litert_torch.convert(module, x, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    except Exception as e:
        return {"status": "failed", "error": _first_line(e)}
    return {"status": "ok", "path": str(path), "mb": _mb(path), "export_s": round(time.perf_counter() - t0, 3)}


def _aeq_quantize(case: Case, float_path: Path, precision: str, path: Path) -> str:
    """The recipe applied as published (no effai edits such as float I/O); returns the I/O dtypes it produced."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(float_path), getattr(recipe, AEQ_RECIPES[precision])())
    calib = None
    if q.need_calibration:
        runner = Interpreter(model_path=str(float_path)).get_signature_runner("serving_default")
        key = next(iter(runner.get_input_details()))
        data = [{key: case.calib[i:i + 1]} for i in range(case.calib.shape[0])]
        calib = q.calibrate({"serving_default": data})
    path.write_bytes(q.quantize(calib).quantized_model)
    interp = Interpreter(model_path=str(path))
    return "/".join(np.dtype(d[0]["dtype"]).name for d in (interp.get_input_details(), interp.get_output_details()))


def upstream_onnx(case: Case, precision: str, path: Path) -> dict[str, Any]:
    def convert(p: Path) -> None:
        torch.onnx.export(case.model, (torch.from_numpy(case.x),), str(p), dynamo=True)

    if precision == "fp32":
        convert(path)
        return {}
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    float_path, float_s = case.float_artifact("onnx-fp32", convert, path.with_name("model.float.onnx"))
    t0 = time.perf_counter()
    if precision == "int8":
        quantize_static(str(float_path), str(path), _OnnxCalibration(float_path, case.calib))
    elif precision == "int8-dynamic":
        quantize_dynamic(str(float_path), str(path))
    else:
        raise NotApplicable(f"no onnxruntime flow for {precision}")
    return {"float_s": round(float_s, 3), "quantize_s": round(time.perf_counter() - t0, 3)}


class _OnnxCalibration:
    """onnxruntime CalibrationDataReader: the calibration samples one at a time."""

    def __init__(self, model: Path, data: np.ndarray) -> None:
        import onnx

        self.name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        self.samples = iter(data[i:i + 1] for i in range(data.shape[0]))

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.samples, None)
        return None if x is None else {self.name: x}


def upstream_coreml(case: Case, precision: str, path: Path) -> dict[str, Any]:
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    def convert(compute: Any, deployment: Any) -> Any:
        with torch.no_grad():
            traced = torch.jit.trace(case.model, torch.from_numpy(case.x))
        return ct.convert(traced, inputs=[ct.TensorType(shape=case.x.shape)], convert_to="mlprogram",
                          compute_precision=compute, minimum_deployment_target=deployment)

    if precision in ("fp16", "fp32"):
        convert(ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32, ct.target.iOS16).save(str(path))
        return {}
    if precision == "int8":
        raise NotApplicable("linear_quantize_activations calibrates with MLModel.predict (needs macOS)")
    configs = {"int8-weight": cto.OpLinearQuantizerConfig(), "int4-weight": cto.OpLinearQuantizerConfig(dtype="int4"),
               "palette4": cto.OpPalettizerConfig(nbits=4), "palette6": cto.OpPalettizerConfig(nbits=6),
               "palette8": cto.OpPalettizerConfig(nbits=8)}
    if precision not in configs:
        raise NotApplicable(f"no coremltools flow for {precision}")
    deployment = "iOS18" if precision == "int4-weight" else "iOS16"   # int4 weights are an iOS18 op
    t0 = time.perf_counter()
    mlmodel = convert(ct.precision.FLOAT16, getattr(ct.target, deployment))
    float_s = time.perf_counter() - t0
    config = cto.OptimizationConfig(global_config=configs[precision])
    compress = cto.palettize_weights if precision.startswith("palette") else cto.linear_quantize_weights
    compress(mlmodel, config).save(str(path))
    return {"float_s": round(float_s, 3), "quantize_s": round(time.perf_counter() - t0 - float_s, 3),
            "minimum_deployment_target": deployment}


UPSTREAM = {"executorch": (upstream_executorch, "model.pte"), "tflite": (upstream_tflite, "model.tflite"),
            "onnx": (upstream_onnx, "model.onnx"), "coreml": (upstream_coreml, "model.mlpackage")}


def run_upstream(case: Case, target: str, precision: str, out: Path) -> dict[str, Any]:
    flow, filename = UPSTREAM[target]
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    t0 = time.perf_counter()
    try:
        with captured(case.log):
            extra = flow(case, precision, path)
    except NotApplicable as e:
        return {"status": "n/a", "reason": str(e)}
    except Exception as e:
        with open(case.log, "a") as f:
            f.write(f"\nupstream {case.name} {target} {precision} failed:\n{traceback.format_exc()}\n")
        return {"status": "failed", "error": _first_line(e)}
    seconds = time.perf_counter() - t0
    if "quantize_s" in extra:   # float conversion (cached per model) + quantization; not the PT2E attempt
        seconds = extra["float_s"] + extra["quantize_s"]
    return {"status": "ok", "path": str(path), "mb": _mb(path), "export_s": round(seconds, 3), **extra}

