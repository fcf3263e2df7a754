"""Calibration data for static quantization (`--calib`, `--calib-samples`), preprocessed exactly as the card says.

Sources: `auto` (default: the card's own data, otherwise photos), `photos` (seeded random crops), `digits` (the
training part of the card's split, never the held-out images), an image directory, an `.npz` with `x` (N,H,W,C
uint8). Fewer than MIN_SAMPLES is warned about; the set's sha256 (over the float tensors fed) goes into the manifest.
Detail: docs/quantization.md, "Calibration" and "effai/export/calibration.py".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import EffaiError, UsageError
from effai.data import photos as samples

DEFAULT_SAMPLES = 128
MIN_SAMPLES = 32
SOURCES = ("auto", "photos", "digits", "DIR", "FILE.npz")


@dataclass(frozen=True)
class Calibration:
    x: np.ndarray                  # N, C, H, W float32, preprocessed per the card
    source: str
    sha256: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "samples": int(self.x.shape[0]), "sha256": self.sha256,
                "warnings": list(self.warnings)}


def load(spec: str, preprocessing: dict[str, Any], card: Any, n: int, seed: int = 0) -> Calibration:
    """N calibration inputs from `spec` (see the module doc)."""
    if n < 1:
        raise UsageError(f"--calib-samples {n} must be >= 1")
    if spec == "auto":
        spec = "digits" if card.extra.get("eval_data") == "digits" else "photos"
    if spec == "photos":
        x, what = _photos(preprocessing, n, seed), f"photos (scikit-image, {n} seeded crops)"
    elif spec == "digits":
        x, what = _digits(preprocessing, card, n, seed)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"--calib {spec}: no such file or directory; give {', '.join(SOURCES)}")
        u8 = _folder(path, preprocessing) if path.is_dir() else _npz(path, preprocessing)
        u8 = _pick(u8, n, seed)
        x = samples.normalize(u8, preprocessing["mean"], preprocessing["std"], preprocessing["channels"])
        what = f"{path} ({u8.shape[0]} images)"
    if not np.isfinite(x).all():
        raise EffaiError(f"--calib {spec}: the preprocessed samples contain NaN/inf; check the card's mean/std")
    warnings = []
    if x.shape[0] < MIN_SAMPLES:
        warnings.append(f"only {x.shape[0]} calibration samples (< {MIN_SAMPLES}): activation ranges may not cover "
                        "deployment data; 100-500 representative images are typical")
    x = np.ascontiguousarray(x, np.float32)
    return Calibration(x, what, hashlib.sha256(x.tobytes()).hexdigest(), tuple(warnings))


def check_finite(model: Any, x: np.ndarray, batch: int = 32) -> None:
    """Run the torch model on the calibration set; name the first layer whose output is NaN/inf (its range, and so
    the quantized model, would be meaningless)."""
    import torch

    bad: list[str] = []

    def hook(name: str):
        def fn(_m: Any, _i: Any, out: Any) -> None:
            if not bad and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                bad.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                model(torch.from_numpy(x[i:i + batch]))
                if bad:
                    break
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise EffaiError(f"calibration produces NaN/inf activations at layer '{bad[0]}', so its quantization range "
                         "is undefined; fix the model's numerics or the --calib data (values far outside the "
                         "training distribution)")


def _photos(pre: dict[str, Any], n: int, seed: int) -> np.ndarray:
    from skimage.transform import resize

    h, w = pre["input_size"]
    rng = np.random.default_rng(seed)
    imgs = [samples.photo(p) for p in samples.PHOTOS]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        img = imgs[i % len(imgs)]
        if i < len(imgs):  # the whole photo first, as the eval transform sees it
            out[i] = samples.resize_crop(img, (h, w), pre["crop_pct"], pre["interpolation"])
            continue
        ih, iw = img.shape[:2]
        s = rng.uniform(0.35, 1.0)
        ch, cw = max(8, int(ih * s)), max(8, int(iw * s))
        top, left = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
        crop = resize(img[top:top + ch, left:left + cw], (h, w), order=1, anti_aliasing=ch > h, preserve_range=True)
        crop = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return samples.normalize(out, pre["mean"], pre["std"], pre["channels"])


def _digits(pre: dict[str, Any], card: Any, n: int, seed: int) -> tuple[np.ndarray, str]:
    import torch

    from effai.data import datasets as data_mod

    h, w = pre["input_size"]
    if h != w:
        raise UsageError(f"--calib digits needs a square input; the export is {h}x{w}")
    data, what = data_mod.load_part("digits", h, pre["channels"], card.extra.get("split"), "train")
    what = "digits" if what.startswith("digits (all") else what
    idx = np.random.default_rng(seed).permutation(len(data))[:n]
    x = data_mod.normalized(data.x[torch.from_numpy(idx)], pre["mean"], pre["std"])
    return x.numpy(), f"{what}, {len(idx)} images"


def _folder(root: Path, pre: dict[str, Any]) -> np.ndarray:
    from effai.data.datasets import IMAGE_SUFFIXES, read_image, regular_images

    files = regular_images(sorted(f for f in root.rglob("*") if not any(part.startswith(".") for part in
                                                                        f.relative_to(root).parts)), f"--calib {root}")
    if not files:
        raise UsageError(f"--calib {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} at any depth); "
                         "point it at a folder of representative images")
    out = [samples.resize_crop(read_image(f, "RGB", "--calib"), tuple(pre["input_size"]), pre["crop_pct"],
                               pre["interpolation"]) for f in files]
    return np.stack(out)


def _npz(path: Path, pre: dict[str, Any]) -> np.ndarray:
    from effai.data.datasets import read_npz

    if path.suffix != ".npz":
        raise UsageError(f"--calib {path} is neither an image folder nor an .npz file")
    x = read_npz(path, ("x",), f"--calib {path}")["x"]
    h, w = pre["input_size"]
    if x.ndim != 4 or x.shape[1:3] != (h, w) or x.shape[3] not in (1, 3) or x.dtype != np.uint8:
        raise UsageError(f"--calib {path}: x is {x.dtype} {tuple(x.shape)}; the model needs uint8 N x {h} x {w} x 3 "
                         "(or x 1): resize the images or pass an image folder, which effai resizes itself")
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def _pick(u8: np.ndarray, n: int, seed: int) -> np.ndarray:
    if u8.shape[0] <= n:
        return u8
    return u8[np.sort(np.random.default_rng(seed).permutation(u8.shape[0])[:n])]
