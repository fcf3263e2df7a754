"""Super-resolution data: LR/HR pairs (bicubic downsampling, x2/x4) cut from scikit-image's photos or a user folder,
held-out photos for evaluation, and segmentation masks (built-in SLIC / Felzenszwalb, or a folder of .png/.npz
masks per image) for SAM-DiffSR. Images load as HxWx3 uint8 RGB; bad files are one-line UsageErrors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import UsageError

# Colour photos shipped inside scikit-image (no download). Evaluation photos are never trained on.
TRAIN_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
HELDOUT_PHOTOS = ("chelsea", "coffee")
MASK_METHODS = ("slic", "felzenszwalb", "none")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 40_000_000          # a decompression bomb is refused before decoding
MAX_MASK_BYTES = 256 << 20


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as HxWx3 uint8."""
    import skimage.data

    if not hasattr(skimage.data, name):
        raise UsageError(f"unknown photo '{name}'; choose from: {', '.join(TRAIN_PHOTOS + HELDOUT_PHOTOS)}")
    return as_rgb8(np.asarray(getattr(skimage.data, name)()), name)


def as_rgb8(img: np.ndarray, what: str) -> np.ndarray:
    """HxWx3 uint8 from a decoded array: grayscale is replicated to RGB, 16-bit is scaled to 8 bits (>> 8), an
    opaque alpha channel is dropped; a transparent RGBA image is refused (no background to composite on)."""
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise UsageError(f"{what}: shape {img.shape} is not an image (need HxW, HxWx3 or HxWx4)")
    if img.shape[2] in (2, 4):
        alpha = img[..., -1]
        full = np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1.0
        if (alpha != full).any():
            raise UsageError(f"{what} has transparent pixels (RGBA/LA with alpha < 100%); flatten it onto a "
                             "background first")
        img = img[..., :-1]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, 2)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype.kind == "f":
        img = np.clip(np.rint(img * 255 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise UsageError(f"{what}: pixel type {img.dtype} is not supported; save it as 8- or 16-bit PNG/JPEG")
    if min(img.shape[:2]) < 2:
        raise UsageError(f"{what} is {img.shape[1]}x{img.shape[0]} pixels; an image needs at least 2x2")
    return np.ascontiguousarray(img)


def load_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (PIL): grayscale/16-bit/palette converted, transparent RGBA refused;
    a missing, non-image or oversized file is a UsageError naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"image not found: {p}; pass a PNG/JPEG file")
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UsageError(f"{p} is {im.width}x{im.height} pixels, over the {MAX_PIXELS:,}-pixel limit; "
                                 "crop or downscale it first")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.int64)
                arr = np.clip(arr, 0, 65535).astype(np.uint16)
                return as_rgb8(arr, str(p))
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode == "F":
                raise UsageError(f"{p} is a floating-point image; save it as 8- or 16-bit PNG/JPEG")
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise UsageError(f"{p} is not an image PIL can read; pass a PNG/JPEG file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{p} cannot be decoded ({type(e).__name__}: {str(e)[:100]}); pass a valid image") from None
    return as_rgb8(arr, str(p))


# ----------------------------------------------------------------------------------------------- resampling

def to_unit(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 in [-1, 1] (SRDiff's range)."""
    return img.astype(np.float32) / 127.5 - 1.0


def from_unit(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] HxWx3 -> uint8 (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic (PIL) downsampling of an HxWx3 uint8 image whose sides are multiples of `scale`; uint8 LR."""
    from PIL import Image

    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise UsageError(f"HR size {w}x{h} is not a multiple of scale {scale}")
    return np.asarray(Image.fromarray(hr).resize((w // scale, h // scale), Image.BICUBIC))


def upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic (PIL, float per channel) upsampling of an HxWxC float image by `scale`: up(LR), the base the model
    adds its residual to. Float in, float32 out, no rounding (train and inference use this same function)."""
    from PIL import Image

    h, w = lr.shape[:2]
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(lr[..., c], np.float32), mode="F")
                        .resize((w * scale, h * scale), Image.BICUBIC)) for c in range(lr.shape[2])]
    return np.stack(chans, -1).astype(np.float32)


def crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


# ---------------------------------------------------------------------------------------------------- masks

def builtin_labels(img: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """A label map (HxW int) from scikit-image: SLIC superpixels (Achanta et al. 2012; ~1 region per 64x64 px,
    compactness 10) or Felzenszwalb's graph segmentation (scale 100, sigma 0.8, min size 50)."""
    from skimage.segmentation import felzenszwalb, slic

    if method == "slic":
        n = max(4, img.shape[0] * img.shape[1] // (64 * 64))
        return slic(img, n_segments=n, compactness=10, start_label=0).astype(np.int64)
    if method == "felzenszwalb":
        return felzenszwalb(img, scale=100, sigma=0.8, min_size=50).astype(np.int64)
    raise UsageError(f"unknown mask method '{method}'; choose from: {', '.join(MASK_METHODS)} or a mask folder")


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A user mask as a label map (HxW int64, -1 = no region): a .png label image (8/16-bit, one id per region;
    an RGB png gets one id per colour) or an .npz with `labels` (HxW ints) or `masks` (N x H x W booleans, one per
    region, e.g. SAM's; later masks win where they overlap). Its size must equal the image's."""
    p = Path(path)
    if p.stat().st_size > MAX_MASK_BYTES:
        raise UsageError(f"mask {p} is over {MAX_MASK_BYTES >> 20} MB")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = set(z.files)
                if "labels" in keys:
                    labels = np.asarray(z["labels"])
                elif "masks" in keys:
                    masks = np.asarray(z["masks"])
                    if masks.ndim != 3 or masks.shape[0] == 0:
                        raise UsageError(f"mask {p}: 'masks' must be N x H x W with N >= 1, got {masks.shape}")
                    labels = np.full(masks.shape[1:], -1, np.int64)
                    for i, m in enumerate(masks):
                        labels[m.astype(bool)] = i
                else:
                    raise UsageError(f"mask {p} holds {sorted(keys)[:5]}; it needs 'labels' (HxW) or 'masks' (NxHxW)")
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"mask {p} is not a readable .npz ({type(e).__name__}); save it with numpy.savez") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"mask {p} is not a readable image ({type(e).__name__}); save it as a .png label "
                             "map") from None
        if arr.ndim == 3:   # a colour label image: one id per distinct colour
            flat = arr.reshape(-1, arr.shape[2])
            _, labels = np.unique(flat, axis=0, return_inverse=True)
            labels = labels.reshape(arr.shape[:2])
        else:
            labels = arr
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise UsageError(f"mask {p} must be an HxW integer label map, got {labels.dtype} {labels.shape}")
    if tuple(labels.shape) != tuple(shape):
        raise UsageError(f"mask {p} is {labels.shape[1]}x{labels.shape[0]} but its image is {shape[1]}x{shape[0]}; "
                         "masks must match their image's size")
    return labels.astype(np.int64)


def mask_files(folder: Path, stems: list[str]) -> dict[str, Path]:
    """One mask file (<stem>.png or <stem>.npz) per image stem; missing or unmatched masks are a UsageError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"mask folder {folder} does not exist; pass a folder of <image>.png/.npz masks or one of: "
                         f"{', '.join(MASK_METHODS)}")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in (".png", ".npz") and f.is_file():
            if f.stem in found:
                raise UsageError(f"two masks for image '{f.stem}' in {folder} ({found[f.stem].name}, {f.name}); "
                                 "keep one")
            found[f.stem] = f
    missing = [s for s in stems if s not in found]
    extra = sorted(set(found) - set(stems))
    if missing or extra:
        raise UsageError(f"mask folder {folder} has {len(found)} masks for {len(stems)} images (no mask for: "
                         f"{', '.join(missing[:3]) or '-'}; no image for: {', '.join(extra[:3]) or '-'}); give one "
                         "<image-stem>.png/.npz per image")
    return {s: found[s] for s in stems}


# ---------------------------------------------------------------------------------------------------- pairs

@dataclass
class SRImages:
    """Training images (uint8 HxWx3) with their segmentation label maps (HxW int, or None without masks) and the
    per-pixel maps the trainer derives from them (`encoded`: SPE codes, float32 HxW; effai.zoo.srdiff.encode_masks)."""

    names: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray | None]
    encoded: list[np.ndarray | None] | None = None


def training_images(data: str = "photos", masks: str = "none", seed: int = 0) -> SRImages:
    """'photos' (scikit-image's TRAIN_PHOTOS) or a folder of images; label maps from `masks` (MASK_METHODS or a
    folder), one per whole image (SAM-DiffSR encodes each image's masks once, offline)."""
    if data == "photos":
        names = list(TRAIN_PHOTOS)
        images = [photo(n) for n in names]
    else:
        folder = Path(data)
        if not folder.is_dir():
            raise UsageError(f"--data {data} is neither 'photos' nor a folder of images")
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise UsageError(f"--data {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        names = [f.stem for f in files]
        images = [load_rgb(f) for f in files]
    labels: list[np.ndarray | None]
    if masks == "none":
        labels = [None] * len(images)
    elif masks in ("slic", "felzenszwalb"):
        labels = [builtin_labels(img, masks, seed) for img in images]
    else:
        files_by_stem = mask_files(Path(masks), names)
        labels = [read_mask(files_by_stem[n], img.shape[:2]) for n, img in zip(names, images)]
    return SRImages(names, images, labels)


def sample_batch(src: SRImages, rng: np.random.Generator, batch: int, hr_size: int, scale: int,
                 hflip: bool = True) -> dict[str, Any]:
    """Random HR crops (hr_size^2), their bicubic LR and up(LR), in [-1,1] NCHW float32, and the crops of the
    encoded masks (N,1,H,W; None when the images have no masks)."""
    hrs, lrs, ups, es = [], [], [], []
    for _ in range(batch):
        i = int(rng.integers(len(src.images)))
        img = src.images[i]
        h, w = img.shape[:2]
        if h < hr_size or w < hr_size:
            raise UsageError(f"image '{src.names[i]}' is {w}x{h}, smaller than the HR crop {hr_size}")
        y, x = int(rng.integers(h - hr_size + 1)), int(rng.integers(w - hr_size + 1))
        hr = img[y:y + hr_size, x:x + hr_size]
        enc = src.encoded[i] if src.encoded is not None else None
        e = None if enc is None else enc[y:y + hr_size, x:x + hr_size]
        if hflip and rng.random() < 0.5:
            hr = hr[:, ::-1]
            e = None if e is None else e[:, ::-1]
        hr = np.ascontiguousarray(hr)
        lr = downsample(hr, scale)
        lr_f = to_unit(lr)
        hrs.append(to_unit(hr))
        lrs.append(lr_f)
        ups.append(upsample(lr_f, scale))
        es.append(e)
    out = {k: np.stack(v).transpose(0, 3, 1, 2).copy() for k, v in (("hr", hrs), ("lr", lrs), ("lr_up", ups))}
    out["encoded"] = None if es[0] is None else np.stack(es)[:, None].astype(np.float32)
    return out


def eval_crops(scale: int, size: int = 96, per_photo: int = 2) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Fixed held-out crops: (name, HR uint8 size^2, LR uint8) from HELDOUT_PHOTOS, evenly placed."""
    size -= size % scale
    out = []
    for name in HELDOUT_PHOTOS:
        img = photo(name)
        h, w = img.shape[:2]
        for k in range(per_photo):
            y = (h - size) * (k + 1) // (per_photo + 1)
            x = (w - size) * (k + 1) // (per_photo + 1)
            hr = np.ascontiguousarray(img[y:y + size, x:x + size])
            out.append((f"{name}#{k}", hr, downsample(hr, scale)))
    return out
