"""TFLite target: litert-torch -> .tflite, run by the ai-edge-litert Interpreter (tflite_runtime as a fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effai.export.targets.base import (TARGETS, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)


class TFLiteTarget:
    name = "tflite"
    description = "TFLite / LiteRT flatbuffer via litert-torch (Android, microcontrollers, Coral)"
    precisions = ("fp32",)
    needs_exported_program = False

    def available(self) -> tuple[bool, str]:
        return require(("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert"), extra="tflite")

    def lower(self, model: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        import litert_torch

        edge_model = litert_torch.convert(model.eval(), example_inputs)
        path = out_dir / "model.tflite"
        edge_model.export(str(path))
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
            details={"ops": ops, "converter": "litert-torch"},
        )

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        interp = _interpreter(out_dir / lowered.model_file)
        interp.allocate_tensors()
        ins = interp.get_input_details()
        outs = interp.get_output_details()
        runtime, version = _runtime_name()

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            for d, x in zip(ins, inputs):
                interp.set_tensor(d["index"], np.ascontiguousarray(x, dtype=d["dtype"]))
            interp.invoke()
            return [interp.get_tensor(d["index"]).copy() for d in outs]

        return Predictor(runtime, version, run)

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> None:
        return None


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
    return TensorSpec(d["name"], shape, np.dtype(d["dtype"]).name, layout or layout_for(shape))


TARGETS.register("tflite", TFLiteTarget())
