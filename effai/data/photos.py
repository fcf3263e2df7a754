"""Parity inputs: real photos shipped inside scikit-image, preprocessed exactly as the model card says, plus a few
seeded Gaussian inputs that exercise the whole input range. Torch-free (numpy + scikit-image) so device-side
code can rebuild the same inputs from what an artifact directory stores.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Photos bundled in scikit-image (no download): colour first, then greyscale ones (replicated to 3 channels).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
          "retina", "camera", "coins", "moon", "clock")
_ORDERS = {"nearest": 0, "bilinear": 1, "bicubic": 3}


def photo(name: str) -> np.ndarray:
    """An HxWx3 uint8 RGB photo from skimage.data."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def resize_crop(img: np.ndarray, size: tuple[int, int], crop_pct: float, interpolation: str) -> np.ndarray:
    """Resize the shorter side to size/crop_pct (timm's eval transform), centre-crop to size; uint8 HxWxC."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    th, tw = size
    scale = max(th, tw) / crop_pct / min(h, w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    order = _ORDERS.get(interpolation, 1)
    out = resize(img, (nh, nw), order=order, anti_aliasing=nh < h, preserve_range=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.clip(np.rint(out[top:top + th, left:left + tw]), 0, 255).astype(np.uint8)


def normalize(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float], channels: int) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x C x H x W float32: (x/255 - mean)/std; greyscale models get the luma channel."""
    x = images_u8.astype(np.float32) / 255.0
    if channels == 1:
        x = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    elif channels != 3:
        raise ValueError(f"photos feed 1- or 3-channel models, not {channels}")
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def gaussian(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """n seeded standard-normal inputs in model-input space (the same on every machine)."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def parity_inputs(preprocessing: dict[str, Any], n_photos: int, n_noise: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float inputs N x C x H x W, the uint8 photos used, a description of each sample)."""
    h, w = preprocessing["input_size"]
    c = preprocessing["channels"]
    names: list[str] = []
    photos = np.zeros((0, h, w, 3), np.uint8)
    if c in (1, 3) and n_photos:
        chosen = [PHOTOS[i % len(PHOTOS)] for i in range(n_photos)]
        photos = np.stack([resize_crop(photo(p), (h, w), preprocessing["crop_pct"], preprocessing["interpolation"])
                           for p in chosen])
        names += [f"photo:{p}" for p in chosen]
        x = normalize(photos, preprocessing["mean"], preprocessing["std"], c)
    else:
        x = np.zeros((0, c, h, w), np.float32)
    noise = gaussian(n_noise if x.shape[0] else n_noise + n_photos, (c, h, w), seed)
    names += [f"gaussian:seed{seed}#{i}" for i in range(noise.shape[0])]
    return np.concatenate([x, noise]), photos, names
