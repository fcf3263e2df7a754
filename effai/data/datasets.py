"""Training data: real datasets held in memory as uint8 tensors at the training resolution.

Sources (`--data`): `digits` (scikit-learn's 1,797 handwritten 8x8 digits, 10 classes, shipped inside scikit-learn,
upsampled); a directory in ImageFolder layout, DIR/<class name>/<image>.(png|jpg|jpeg|bmp|webp); a CIFAR-style `.npz`
with `x` (N,H,W,C or N,C,H,W uint8), `y` (N,) and optional `classes`. Splits are stratified and seeded, so the
held-out set is the same for training, export and evaluation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effai.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageData:
    x: torch.Tensor            # uint8, N x C x H x W
    y: torch.Tensor            # int64, N
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor) -> ImageData:
        return ImageData(self.x[idx], self.y[idx], self.classes, self.source)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.x.numpy().tobytes())
        h.update(self.y.numpy().tobytes())
        return h.hexdigest()[:16]


def load(spec: str, size: int, channels: int) -> ImageData:
    """Load a dataset and bring every image to `channels` x size x size (shorter side resize + centre crop)."""
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # N,1,8,8
        return ImageData(_fit(x, size, channels), torch.from_numpy(d.target).long(), [str(i) for i in range(10)],
                         "digits")
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--data {spec}: no such file or directory; give 'digits', an image folder or an .npz")
    if path.is_dir():
        return _image_folder(path, size, channels)
    if path.suffix == ".npz":
        return _npz(path, size, channels)
    raise UsageError(f"--data {spec} is neither an image folder nor an .npz file")


def split(data: ImageData, val_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """Stratified, seeded train/validation split."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(len(data.classes)):
        idx = torch.nonzero(data.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return data.subset(torch.cat(train_idx).sort().values), data.subset(torch.cat(val_idx).sort().values)


def load_part(spec: str, size: int, channels: int, split_spec: dict | None, part: str) -> tuple[ImageData, str]:
    """The `part` ("train" | "val") of a run's recorded split (`{"data", "seed", "val_fraction"}`) when `spec` is the
    set it was trained on; the whole set otherwise. Returns the data and a description for manifests."""
    data = load(spec, size, channels)
    if not (split_spec and split_spec.get("data") == spec):
        return data, f"{spec} (all {len(data)})"
    train_part, val_part = split(data, split_spec["val_fraction"], split_spec["seed"])
    if part == "train":
        return train_part, f"{spec} training split (seed {split_spec['seed']})"
    return val_part, (f"{spec} held-out split (seed {split_spec['seed']}, {split_spec['val_fraction']:.0%}: "
                      f"{len(val_part)} images)")


def normalized(x: torch.Tensor, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]) -> torch.Tensor:
    """uint8 N,C,H,W -> float32 (x / 255 - mean) / std, the model's input."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def _fit(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 N,C,h,w -> uint8 N,channels,size,size (bilinear; shorter side then centre crop)."""
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).round()
        else:
            raise UsageError(f"images have {x.shape[1]} channels; the model takes {channels}")
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


MAX_CLASSES = 65536
MAX_IMAGE_PIXELS = 89_478_485   # PIL's own decompression-bomb bound (a 9459 x 9459 image): larger is refused


def regular_images(files: list[Path], what: str) -> list[Path]:
    """The image files among `files` that are regular files (or links to one); FIFOs, devices, sockets and broken
    links are skipped (opening a FIFO blocks forever), with one warning saying how many."""
    import stat
    import warnings

    keep, skipped = [], []
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            regular = stat.S_ISREG(os.stat(f).st_mode)
        except OSError:
            regular = False
        (keep if regular else skipped).append(f)
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} image name(s) that are not regular files (FIFOs, devices, "
                      f"broken links), e.g. {skipped[0]}", stacklevel=2)
    return keep


def read_image(f: Path, mode: str, what: str) -> np.ndarray:
    """Decode one image to a uint8 array in PIL `mode`, refusing images whose header declares more than
    MAX_IMAGE_PIXELS pixels before any pixel is decoded. UsageError naming the file otherwise."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels")
                return np.asarray(im.convert(mode))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        detail = str(e).split(", could be")[0]   # PIL's own refusal at open: "Image size (N pixels) exceeds ..."
        raise UsageError(f"{what}: image {f} declares more pixels than effai decodes ({detail}); the limit is "
                         f"{MAX_IMAGE_PIXELS:,} pixels per image (PIL's decompression-bomb bound): downscale it or "
                         "remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's decoders raise these
        raise UsageError(f"{what}: cannot read image {f} ({e}); remove or fix it") from None


def _image_folder(root: Path, size: int, channels: int) -> ImageData:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, i) for i, c in enumerate(classes)
             for f in regular_images(sorted((root / c).rglob("*")), f"--data {root}")]
    if not files:
        raise UsageError(f"--data {root}: no images found; expected {root}/<class name>/<image>.png|jpg")
    if len(classes) < 2:
        raise UsageError(f"--data {root}: found {len(classes)} class folder(s); classification needs at least 2")
    xs, ys = [], []
    mode = "L" if channels == 1 else "RGB"
    for f, label in files:
        arr = read_image(f, mode, "--data")
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        xs.append(_fit(t[None], size, channels)[0])
        ys.append(label)
    return ImageData(torch.stack(xs), torch.tensor(ys), classes, str(root))


def read_npz(path: Path, names: tuple[str, ...], what: str, optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Arrays `names` (and `optional` ones when present) of an .npz, their declared sizes checked from the member
    headers before numpy reads them (effai.files.npz_headers: a bounded, clear UsageError otherwise)."""
    from effai.files import npz_headers

    headers = npz_headers(path, what, names + optional)
    missing = [n for n in names if n not in headers]
    if missing:
        raise UsageError(f"{what}: it has no array {', '.join(repr(n) for n in missing)} (it holds "
                         f"{', '.join(headers) or 'no arrays'})")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {n: np.asarray(z[n]) for n in names + optional if n in headers}
    except (KeyError, ValueError, OSError, EOFError) as e:
        raise UsageError(f"{what}: cannot read it ({type(e).__name__}: {str(e)[:160]})") from None


def _npz(path: Path, size: int, channels: int) -> ImageData:
    what = f"--data {path}"
    arrays = read_npz(path, ("x", "y"), what, optional=("classes",))
    x, y = arrays["x"], arrays["y"]
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise UsageError(f"--data {path}: x has shape {x.shape} and y {y.shape}; need x N,H,W,C and y N (N >= 1)")
    floating = np.issubdtype(x.dtype, np.floating)
    if not (floating or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_) \
            or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"--data {path}: x is {x.dtype} and y {y.dtype}; need uint8 (or float) images and integer "
                         "labels")
    if floating:  # floats in [0, 1] or [0, 255]
        x = x.astype(np.float32)
        x = (x * 255 if float(np.nanmax(x)) <= 1.0 else x).round().clip(0, 255)
    x = x if x.dtype == np.uint8 else np.nan_to_num(x).clip(0, 255).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    labels = torch.from_numpy(y.astype(np.int64))
    n_classes = int(labels.max()) + 1
    if n_classes > MAX_CLASSES:
        raise UsageError(f"--data {path}: labels go up to {n_classes - 1}, over effai's limit of {MAX_CLASSES} "
                         "classes; labels must be 0..K-1")
    classes = classes or [str(i) for i in range(n_classes)]
    if int(labels.min()) < 0 or n_classes > len(classes):
        raise UsageError(f"--data {path}: labels must lie in 0..{len(classes) - 1}, found {int(labels.min())}.."
                         f"{n_classes - 1}")
    return ImageData(_fit(t.to(torch.uint8), size, channels), labels, classes, str(path))


def augment(x: torch.Tensor, g: torch.Generator, *, hflip: bool, jitter: float, pad_frac: float = 0.125) -> torch.Tensor:
    """Batch augmentation on float images in [0, 1]: random translation (reflect pad + crop), optional horizontal
    flip, brightness/contrast jitter. No mixup/cutmix: they hurt compact models (GhostNetV3 §1)."""
    n, c, h, w = x.shape
    pad = max(1, int(round(h * pad_frac)))
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    x = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, c, h, w)
    x = torch.gather(x, 3, cols)
    if hflip:
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if jitter > 0:
        b = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * jitter
        k = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * jitter
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x * b - mean * b) * k + mean * b).clamp(0, 1)
    return x
