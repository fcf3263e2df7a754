"""One SR model behind two faces, torch (a trained run) or an exported artifact (its runtime), and `upscale()`:
LR uint8 image -> tiled DDIM sampling -> HR uint8 image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effai.data import sr as data
from effai.errors import UsageError
from effai.superres import sampler, tiles
from effai.zoo.srdiff import RES_RESCALE

SR_JSON = "sr.json"


@dataclass
class SRModel:
    """encode(lr (1,3,h,w)) -> cond; step(x_t, t, cond) -> eps; spec: the SRDiffSpec dict; abar: abar_t."""

    encode: Callable[[np.ndarray], np.ndarray]
    step: Callable[[np.ndarray, int, np.ndarray], np.ndarray]
    spec: dict[str, Any]
    abar: np.ndarray
    runtime: str


def torch_model(run: Path | str) -> SRModel:
    import torch

    from effai.zoo import srdiff

    model, _ = srdiff.load(run)

    @torch.no_grad()
    def encode(lr: np.ndarray) -> np.ndarray:
        return model.encoder(torch.from_numpy(np.ascontiguousarray(lr, np.float32))).numpy()

    @torch.no_grad()
    def step(x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        return model.denoiser(torch.from_numpy(x), torch.tensor([float(t)]), torch.from_numpy(cond)).numpy()

    return SRModel(encode, step, model.spec.to_dict(), srdiff.alphas_cumprod(model.spec), "torch")


def artifact_model(path: Path | str) -> SRModel:
    """An `effai sr export` artifact dir, run in its target's runtime (encoder and step each a model file)."""
    from effai.export.targets import TARGETS
    from effai.export.targets.base import Lowered, TensorSpec
    from effai.files import read_json
    from effai.zoo.srdiff import SRDiffSpec, alphas_cumprod

    root = Path(path)
    if not (root / SR_JSON).is_file():
        raise UsageError(f"{root} is not an SR artifact (no {SR_JSON}); export one with `effai sr export RUN`, or "
                         "pass a training run dir")
    meta = read_json(root / SR_JSON, f"{SR_JSON} of {root}")
    if not isinstance(meta, dict) or "spec" not in meta or "target" not in meta:
        raise UsageError(f"{root / SR_JSON} is malformed (no spec/target); re-export it")
    target = TARGETS.get(meta["target"])
    preds = {}
    for part in ("encoder", "step"):
        low = meta["parts"][part]["lowered"]
        lowered = Lowered(low["model_file"], [TensorSpec(i["name"], tuple(i["shape"])) for i in low["inputs"]],
                          [TensorSpec(o["name"], tuple(o["shape"])) for o in low["outputs"]])
        pred = target.load(root / part, lowered)
        if isinstance(pred, str):
            raise UsageError(f"{root}: no {meta['target']} runtime here ({pred})")
        preds[part] = (pred, [tuple(i["shape"]) for i in low["inputs"]])
    enc_pred, _ = preds["encoder"]
    step_pred, shapes = preds["step"]

    def encode(lr: np.ndarray) -> np.ndarray:
        return np.asarray(enc_pred.run([np.ascontiguousarray(lr, np.float32)])[0])

    ordered = _order_by_shape(shapes)

    def step(x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        args = {"x": x, "t": np.array([float(t)], np.float32), "cond": cond}
        return np.asarray(step_pred.run([np.ascontiguousarray(args[k], np.float32) for k in ordered])[0])

    spec = SRDiffSpec(**meta["spec"])
    return SRModel(encode, step, spec.to_dict(), alphas_cumprod(spec), f"{meta['target']}:{step_pred.runtime}")


def _order_by_shape(shapes: list[tuple[int, ...]]) -> list[str]:
    """Which of x (1,3,H,W), t (1,), cond (1,C,h,w) each runtime input is, by shape (LiteRT may reorder inputs):
    t is the 1-D one, x the widest 4-D one."""
    widest = max((s[-1] for s in shapes if len(s) == 4), default=0)
    out = ["t" if len(s) == 1 else "x" if s[-1] == widest else "cond" for s in shapes]
    return out if sorted(out) == ["cond", "t", "x"] else ["x", "t", "cond"]


def load(path: Path | str) -> SRModel:
    """A training run (model.safetensors) in torch, or an exported artifact dir in its runtime."""
    from effai.zoo.srdiff import DEFAULTS

    if str(path) in DEFAULTS:
        return torch_model(str(path))
    p = Path(path)
    if (p / SR_JSON).is_file():
        return artifact_model(p)
    if p.suffix == ".safetensors" or (p / "model.safetensors").is_file():
        return torch_model(p)
    raise UsageError(f"{p} is neither an SR artifact (effai sr export) nor a run of `effai train sr`")


def upscale(model: SRModel, lr: np.ndarray, scale: int, steps: int = 8, seed: int = 0, overlap: int = 4,
            on_tile: Callable[[int, int], Any] | None = None,
            on_step: Callable[[], None] | None = None) -> np.ndarray:
    """HR uint8 (H*scale x W*scale x 3) from an LR uint8 image: tiles of the trained LR size, DDIM per tile."""
    trained = model.spec["scale"]
    if scale != trained:
        raise UsageError(f"--scale {scale} is not a scale this model was trained for; choose from: {trained}")
    sampler.timesteps(len(model.abar), steps)   # a bad --steps fails before any work
    tile = model.spec["lr_size"]

    def sample_tile(lr_t: np.ndarray, up_t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        cond = model.encode(lr_t)
        x0 = sampler.ddim(model.step, cond, noise, model.abar, steps, on_step)
        return x0 / RES_RESCALE

    hr = tiles.super_resolve(data.to_unit(lr), scale, tile, min(overlap, tile - 1), sample_tile, data.upsample,
                             seed, on_tile)
    return data.from_unit(hr)
