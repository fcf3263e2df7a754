"""`effai bench` of an SR artifact (the dir `effai sr export` writes): latency per image at a given LR size and DDIM
step count, on this host, in the artifact's runtime. Per image: the tiled sampler of `effai sr` (LR encoder once per
tile, the exported denoiser step `steps` times per tile, blending); the input is a crop of a real held-out photo
(chelsea, mirrored past its edge when the size asks for more), so the timing is the one `effai sr` would see."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import UsageError

MAX_SIDE = 4096     # LR pixels per side: a bench, not a decompression bomb


def is_artifact(path: Path | str) -> bool:
    """Does `path` look like an SR artifact dir (an sr.json with spec, parts and target)? artifact_model checks it."""
    from effai.files import read_json
    from effai.superres.engine import SR_JSON

    f = Path(path) / SR_JSON
    if not f.is_file():
        return False
    try:
        meta = read_json(f)
    except UsageError:
        return False
    return isinstance(meta, dict) and all(k in meta for k in ("spec", "parts", "target"))


def parse_size(text: str | None) -> tuple[int, int] | None:
    """--sr-size "64x48" -> (64, 48) (LR width, height); None: one trained tile."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--sr-size '{text}' must be the LR image size WxH, like 64x48") from None
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise UsageError(f"--sr-size '{text}': each side must be between 1 and {MAX_SIDE} LR pixels")
    return w, h


def lr_image(w: int, h: int) -> np.ndarray:
    """A w x h LR uint8 crop of the held-out photo chelsea (mirrored where the size exceeds it)."""
    from effai.data import sr as data

    img = data.photo("chelsea")
    ph, pw = max(0, h - img.shape[0]), max(0, w - img.shape[1])
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(img[:h, :w])


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(float(np.median(xs)), 3), "p90": round(float(np.percentile(xs, 90)), 3)}


def bench_sr(path: Path, size: tuple[int, int] | None = None, steps: int = 8, repeats: int = 5,
             warmup: int = 1, overlap: int = 4) -> dict[str, Any]:
    """Median and p90 over `repeats` images after `warmup`: ms per image, ms per denoiser step call, ms per encoder
    call; load time and the first image apart."""
    from effai.superres import engine, sampler, tiles

    if repeats < 1 or warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    t0 = time.perf_counter()
    model = engine.artifact_model(path)
    load_ms = (time.perf_counter() - t0) * 1e3
    sampler.timesteps(len(model.abar), steps)
    tile, scale = int(model.spec["lr_size"]), int(model.spec["scale"])
    w, h = size or (tile, tile)
    lr = lr_image(w, h)
    ov = min(overlap, tile - 1)
    n_tiles = len(tiles.starts(max(h, tile), tile, ov)) * len(tiles.starts(max(w, tile), tile, ov))
    step_ms: list[float] = []
    enc_ms: list[float] = []
    encode, step = model.encode, model.step

    def timed_encode(x: np.ndarray) -> np.ndarray:
        s = time.perf_counter()
        out = encode(x)
        enc_ms.append((time.perf_counter() - s) * 1e3)
        return out

    def timed_step(x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        s = time.perf_counter()
        out = step(x, t, cond)
        step_ms.append((time.perf_counter() - s) * 1e3)
        return out

    model.encode, model.step = timed_encode, timed_step
    per_image, first_ms = [], 0.0
    for i in range(1 + warmup + repeats):
        if i == 1 + warmup:
            step_ms.clear()
            enc_ms.clear()
        s = time.perf_counter()
        engine.upscale(model, lr, scale, steps, 0, ov)
        ms = (time.perf_counter() - s) * 1e3
        if i == 0:
            first_ms = ms
        elif i > warmup:
            per_image.append(ms)
    meta_files = [p for p in Path(path).rglob("*") if p.is_file()]
    hr_px = w * scale * h * scale
    return {"artifact": str(path), "kind": "sr", "target": model.runtime.split(":")[0],
            "runtime": model.runtime.split(":", 1)[-1], "precision": _precision(path), "scale": scale,
            "lr_size": [w, h], "hr_size": [w * scale, h * scale], "steps": steps, "tiles": n_tiles,
            "repeats": repeats, "warmup": warmup, "ms_per_image": _stats(per_image),
            "ms_per_step": _stats(step_ms), "ms_per_encode": _stats(enc_ms),
            "hr_megapixels_per_s": round(hr_px / 1e6 / (float(np.median(per_image)) / 1e3), 4),
            "first_ms": round(first_ms, 3), "load_ms": round(load_ms, 3),
            "artifact_bytes": sum(p.stat().st_size for p in meta_files)}


def _precision(path: Path) -> str:
    from effai.files import read_json
    from effai.superres.engine import SR_JSON

    return str(read_json(Path(path) / SR_JSON).get("precision", "fp32"))
