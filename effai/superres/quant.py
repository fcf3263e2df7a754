"""Static int8 of the SR denoiser step on ExecuTorch (XNNPACK PT2E) and ONNX Runtime (QDQ). The step has three inputs
(x_t, t, cond), which the targets' own static calibration (one input) cannot feed, so the step is calibrated here on
real sampler trajectories: crops of the TRAINING photos (never the held-out ones the PSNR gate measures), their
encoder features, and every (x_t, t) the 8-step DDIM sampler visits from seeded noise. The encoder (one input) is
calibrated by the target itself on the same LR crops."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

CALIB_CROPS_PER_PHOTO = 2
CALIB_STEPS = 8
STATIC_INT8_TARGETS = ("executorch", "onnx")


def calibration(model: Any, crops_per_photo: int = CALIB_CROPS_PER_PHOTO, steps: int = CALIB_STEPS,
                seed: int = 0) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(LR batch N,3,h,w for the encoder, [(x_t, t, cond)] for the step) from the training photos."""
    import torch

    from effai.data import sr as data
    from effai.superres import sampler
    from effai.zoo.srdiff import DenoiserStep, alphas_cumprod

    spec = model.spec
    step = DenoiserStep(model).eval()
    abar = alphas_cumprod(spec)
    rng = np.random.default_rng(seed)
    lrs, samples = [], []

    @torch.no_grad()
    def record(x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        tt = np.array([float(t)], np.float32)
        samples.append((x.copy(), tt, cond))
        return step(torch.from_numpy(x), torch.from_numpy(tt), torch.from_numpy(cond)).numpy()

    for name in data.TRAIN_PHOTOS:
        img = data.photo(name)
        for _ in range(crops_per_photo):
            y = int(rng.integers(0, img.shape[0] - spec.hr_size + 1))
            x = int(rng.integers(0, img.shape[1] - spec.hr_size + 1))
            lr = data.downsample(np.ascontiguousarray(img[y:y + spec.hr_size, x:x + spec.hr_size]), spec.scale)
            lr_f = data.to_unit(lr).transpose(2, 0, 1)[None].copy()
            lrs.append(lr_f)
            with torch.no_grad():
                cond = model.encoder(torch.from_numpy(lr_f)).numpy()
            noise = rng.standard_normal((1, 3, spec.hr_size, spec.hr_size)).astype(np.float32)
            sampler.ddim(record, cond, noise, abar, steps)
    return np.concatenate(lrs), samples


def lower_step_executorch_int8(module: Any, example: tuple, samples: list[tuple[np.ndarray, ...]],
                               input_names: tuple[str, ...], output_names: tuple[str, ...], out_dir: Path) -> Any:
    """The step as a static-int8 XNNPACK .pte (what effai/export/targets/executorch.py does for one-input models,
    with the three-input calibration above); returns its Lowered."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from effai.export.targets.base import Lowered, TensorSpec, layout_for
    from effai.export.targets.executorch import decompose_for_xnnpack, delegation_summary
    from effai.export.trace import trace

    t0 = time.perf_counter()
    with torch.no_grad():
        out_shape = tuple(module(*example).shape)
    exported = decompose_for_xnnpack(trace(module, example))
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for s in samples:
            prepared(*(torch.from_numpy(np.ascontiguousarray(v)) for v in s))
    requantized = torch.export.export(convert_pt2e(prepared), example)
    edge = to_edge_transform_and_lower(requantized, partitioner=[XnnpackPartitioner()])
    delegation = delegation_summary(edge.exported_program().graph_module)
    (out_dir / "model.pte").write_bytes(edge.to_executorch().buffer)
    q_nodes = sum(1 for n in requantized.graph.nodes if "dequantize_per_channel" in str(n.target))
    return Lowered("model.pte",
                   [TensorSpec(n, tuple(x.shape)) for n, x in zip(input_names, example)],
                   [TensorSpec(output_names[0], out_shape, "float32", layout_for(out_shape))],
                   {"backend": "XnnpackBackend", "delegation": delegation,
                    "quantization": {"scheme": "XNNPACK PT2E static int8 (per-channel weights, activations "
                                               "calibrated on DDIM trajectories of training-photo crops)",
                                     "layers_quantized": q_nodes, "calibration_samples": len(samples)},
                    "seconds_quantize": time.perf_counter() - t0})


class _StepBatches:
    """onnxruntime CalibrationDataReader over the (x_t, t, cond) samples; `keys[i]` says which of x, t, cond the
    graph's input `names[i]` is."""

    def __init__(self, names: list[str], keys: list[str], samples: list[tuple[np.ndarray, ...]]) -> None:
        self.names, self.keys, self.samples, self.i = names, keys, samples, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.samples):
            return None
        s = dict(zip(("x", "t", "cond"), self.samples[self.i]))
        self.i += 1
        return {n: np.ascontiguousarray(s[k], np.float32) for n, k in zip(self.names, self.keys)}


def quantize_step_onnx_int8(out_dir: Path, lowered: Any, samples: list[tuple[np.ndarray, ...]]) -> Any:
    """The fp32 step ONNX file in `out_dir` rewritten as static int8 (QDQ) with the settings, and for the reasons,
    of effai/export/targets/onnx.py `quantize_int8` (uint8 asymmetric activations, int8 symmetric per-channel
    7-bit weights, MinMax), calibrated on the three-input samples; returns the updated Lowered."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    from effai.export.targets.onnx import count_quantized_nodes, static_op_types
    from effai.superres.engine import _order_by_shape

    t0 = time.perf_counter()
    path = out_dir / lowered.model_file
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [i.name for i in graph.input]
    shapes = [tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in graph.input]
    reader = _StepBatches(names, _order_by_shape(shapes), samples)
    with tempfile.TemporaryDirectory(prefix="effai-sr-int8-") as work:
        pre, out = Path(work) / "pre.onnx", Path(work) / "quant.onnx"
        quant_pre_process(str(path), str(pre))
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=static_op_types(), calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        q = onnx.load(str(out))
        out.replace(path)
    details = dict(lowered.details)
    details["precision"] = "int8"
    details["quantization"] = {"scheme": "onnxruntime static int8 QDQ (uint8 activations, int8 per-channel 7-bit "
                                         "weights, MinMax on DDIM trajectories of training-photo crops)",
                               "nodes_quantized": count_quantized_nodes(q), "calibration_samples": len(samples),
                               "seconds_quantize": time.perf_counter() - t0}
    lowered.details = details
    return lowered
