"""Tiled super-resolution: the image is cut into trained-size LR tiles with overlap, each tile is sampled on its own,
and the HR tiles are blended with linear-ramp weights (sum w * tile / sum w). Memory: a few HR-sized float arrays
(output, weights, up(LR), the initial noise) plus one tile's tensors; the model never sees more than a tile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from effai.errors import UsageError


def starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, n): stride tile - overlap, the last tile flush with the end."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    out = list(range(0, n - tile, stride))
    out.append(n - tile)
    return sorted(set(out))


def ramp(n: int, overlap: int) -> np.ndarray:
    """1-D blend weight of one HR tile side: min(1, (i + 0.5) / o, (n - i - 0.5) / o), o = overlap in HR pixels;
    always > 0, so every pixel has weight where tiles cover it."""
    if overlap <= 0:
        return np.ones(n, np.float32)
    i = np.arange(n, dtype=np.float32)
    return np.minimum(1.0, np.minimum((i + 0.5) / overlap, (n - i - 0.5) / overlap)).astype(np.float32)


def super_resolve(lr: np.ndarray, scale: int, tile: int, overlap: int,
                  sample_tile: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                  up: Callable[[np.ndarray, int], np.ndarray], seed: int = 0,
                  on_tile: Callable[[int, int], Any] | None = None) -> np.ndarray:
    """HR image (float32 HxWx3 in [-1,1]) from an LR image (float32 hxwx3 in [-1,1]).

    `sample_tile(lr_tile (1,3,t,t), lr_up_tile (1,3,T,T), noise (1,3,T,T)) -> HR residual (1,3,T,T)`; the HR
    result is up(LR) + residual. The initial noise is drawn once for the whole HR image from `seed` and sliced per tile,
    so overlapping tiles start from the same noise. Images smaller than a tile are edge-padded to it and cropped
    (up(LR) and the noise are made at the image's own size first, so padding does not change them)."""
    if not 0 <= overlap < tile:
        raise UsageError(f"--overlap {overlap} must be in [0, {tile - 1}] (LR pixels, tile {tile})")
    h, w = lr.shape[:2]
    ph, pw = max(h, tile), max(w, tile)
    lr_up = up(lr, scale)     # of the image itself, and the noise of its own size: padding changes neither
    noise = np.random.default_rng(seed).standard_normal((3, h * scale, w * scale)).astype(np.float32)
    if (ph, pw) != (h, w):
        pad = ((0, (ph - h) * scale), (0, (pw - w) * scale))
        lr = np.pad(lr, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        lr_up = np.pad(lr_up, pad + ((0, 0),), mode="edge")
        noise = np.pad(noise, ((0, 0),) + pad, mode="wrap")
    H, W = ph * scale, pw * scale
    acc = np.zeros((3, H, W), np.float32)
    wsum = np.zeros((H, W), np.float32)
    T = tile * scale
    wt = np.outer(ramp(T, overlap * scale), ramp(T, overlap * scale))
    ys, xs = starts(ph, tile, overlap), starts(pw, tile, overlap)
    total, k = len(ys) * len(xs), 0
    up_chw = lr_up.transpose(2, 0, 1)
    for y in ys:
        for x in xs:
            lr_t = lr[y:y + tile, x:x + tile].transpose(2, 0, 1)[None]
            Y, X = y * scale, x * scale
            up_t = up_chw[:, Y:Y + T, X:X + T][None]
            res = sample_tile(np.ascontiguousarray(lr_t), np.ascontiguousarray(up_t),
                              np.ascontiguousarray(noise[:, Y:Y + T, X:X + T][None]))
            acc[:, Y:Y + T, X:X + T] += wt * (up_t[0] + res[0])
            wsum[Y:Y + T, X:X + T] += wt
            k += 1
            if on_tile:
                on_tile(k, total)
    out = (acc / wsum).transpose(1, 2, 0)
    return np.ascontiguousarray(out[: h * scale, : w * scale])
