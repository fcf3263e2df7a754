"""Static int8 of the SR denoiser step on ExecuTorch (XNNPACK PT2E): the step has three inputs (x_t, t, cond), which
the targets' own static calibration (one input) cannot feed, so the step is calibrated here on real sampler
trajectories: crops of the TRAINING photos (never the held-out ones the PSNR gate measures), their encoder
features, and every (x_t, t) the 8-step DDIM sampler visits from seeded noise. The encoder (one input) is calibrated
by the target itself on the same LR crops."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

CALIB_CROPS_PER_PHOTO = 2
CALIB_STEPS = 8
STATIC_INT8_TARGETS = ("executorch",)


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
