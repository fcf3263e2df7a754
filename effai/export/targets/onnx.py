"""ONNX target: torch.onnx dynamo export -> onnxslim -> .onnx (weights inline when < 2 GB), run by onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effai.export.targets.base import (TARGETS, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)

OPSET = 18                 # the dynamo exporter's native opset; onnxruntime >= 1.16 runs it
INLINE_LIMIT = 2 * 1024**3  # protobuf's hard limit: larger models keep weights in model.onnx.data


class OnnxTarget:
    name = "onnx"
    description = "ONNX (opset 18, simplified with onnxslim) for onnxruntime / ONNX Runtime Mobile"
    precisions = ("fp32",)
    needs_exported_program = True

    def available(self) -> tuple[bool, str]:
        return require(("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"),
                       ("onnxslim", "onnxslim"), extra="onnx")

    def lower(self, exported: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        import onnx
        import onnxslim
        import torch

        onnx_program = torch.onnx.export(exported, example_inputs, dynamo=True, opset_version=OPSET,
                                         input_names=list(options.input_names),
                                         output_names=list(options.output_names), verbose=False)
        proto = onnx_program.model_proto
        nodes_before = len(proto.graph.node)
        slim = onnxslim.slim(proto)
        path = out_dir / "model.onnx"
        large = slim.ByteSize() >= INLINE_LIMIT
        onnx.save_model(slim, str(path), save_as_external_data=large, location="model.onnx.data" if large else None)
        onnx.checker.check_model(str(path))
        ops: dict[str, int] = {}
        for n in slim.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return Lowered(
            model_file=path.name,
            inputs=[_spec(v, "NCHW") for v in slim.graph.input],
            outputs=[_spec(v, None) for v in slim.graph.output],
            details={"opset": OPSET, "nodes_before_slim": nodes_before, "nodes": len(slim.graph.node), "ops": ops,
                     "external_data": large},
        )

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


def _spec(value_info: Any, layout: str | None) -> TensorSpec:
    import onnx

    t = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorSpec(value_info.name, shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      layout or layout_for(shape))


TARGETS.register("onnx", OnnxTarget())
