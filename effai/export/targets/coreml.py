"""Core ML target: torch.jit.trace -> coremltools -> .mlpackage (ML program), fp16 or fp32 compute.

coremltools converts on Linux, but the Core ML runtime exists only on macOS: there, parity runs predictions; on
Linux the package is verified structurally (inputs, outputs, op census, weight dtypes) and parity says so.
(coremltools 9's torch.export path fails on GhostNetV3 with "Unsupported fx node alias"; the trace path works.)
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from effai.export.targets.base import (TARGETS, Lowered, LowerOptions, Predictor, TensorSpec, layout_for,
                                       package_versions, require)

MIN_TARGET = "iOS16"   # ML programs with fp16 compute need iOS 15+; iOS 16 adds the ops modern nets use


class CoreMLTarget:
    name = "coreml"
    description = "Core ML .mlpackage (ML program) for iOS/macOS (CPU, GPU, Neural Engine)"
    precisions = ("fp16", "fp32")
    needs_exported_program = False

    def available(self) -> tuple[bool, str]:
        return require(("coremltools", "coremltools"), extra="coreml")

    def lower(self, model: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered:
        import coremltools as ct
        import torch

        _patch_int_cast_for_numpy2()
        with torch.no_grad():
            traced = torch.jit.trace(model.eval(), example_inputs)
        precision = ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32
        mlmodel = ct.convert(
            traced,
            # fp32 I/O even for fp16 compute: apps feed float MLMultiArrays, Core ML casts at the boundary
            inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32)
                    for n, x in zip(options.input_names, example_inputs)],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in options.output_names],
            convert_to="mlprogram",
            compute_precision=precision,
            minimum_deployment_target=getattr(ct.target, MIN_TARGET),
        )
        path = out_dir / "model.mlpackage"
        mlmodel.save(str(path))
        summary = spec_summary(path)
        return Lowered(
            model_file=path.name,
            inputs=[TensorSpec(i["name"], tuple(i["shape"]), i["dtype"], "NCHW") for i in summary["inputs"]],
            outputs=[TensorSpec(o["name"], tuple(o["shape"]), o["dtype"], layout_for(tuple(o["shape"])))
                     for o in summary["outputs"]],
            details={"minimum_deployment_target": MIN_TARGET, "compute_precision": options.precision,
                     "spec": summary},
        )

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        if platform.system() != "Darwin":
            return "Core ML runtime needs macOS"
        import coremltools as ct

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
        want_w = "fp16" if expected["precision"] == "fp16" else "fp32"
        if want_w not in s["weight_dtypes"]:
            problems.append(f"weights are {sorted(s['weight_dtypes'])}, expected {want_w}")
        return {"status": "fail" if problems else "pass", "problems": problems, **s}


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
               "INT32": "int32", "UINT4": "uint4", "BOOL": "bool", "STRING": "string", "INT16": "int16"}


def spec_summary(path: Path) -> dict[str, Any]:
    """Inputs, outputs, op census and the dtypes of const tensors (weights) of a saved .mlpackage."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(path))

    def feat(f: Any) -> dict[str, Any]:
        arr = f.type.multiArrayType
        return {"name": f.name, "shape": [int(d) for d in arr.shape], "dtype": _DTYPES.get(arr.dataType, str(arr.dataType))}

    ops: dict[str, int] = {}
    weight_dtypes: dict[str, int] = {}
    dtype_names = {v: k for k, v in MIL_pb2.DataType.items()}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
                if op.type == "const":
                    for out in op.outputs:
                        t = out.type.tensorType
                        if len(t.dimensions) >= 1 and _numel(t) > 16:  # weights, not scalars or shape vectors
                            name = _MIL_DTYPES.get(dtype_names.get(t.dataType, ""), str(t.dataType))
                            weight_dtypes[name] = weight_dtypes.get(name, 0) + 1
    return {"inputs": [feat(f) for f in spec.description.input], "outputs": [feat(f) for f in spec.description.output],
            "spec_version": spec.specificationVersion, "op_count": sum(ops.values()), "ops": ops,
            "weight_dtypes": weight_dtypes}


def _numel(t: Any) -> int:
    n = 1
    for d in t.dimensions:
        n *= int(d.constant.size) if d.HasField("constant") else 1
    return n


TARGETS.register("coreml", CoreMLTarget())
