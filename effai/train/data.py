"""Training data: real datasets held in memory as uint8 tensors at the training resolution.

Sources (`--data`):
- `digits`: scikit-learn's 1,797 handwritten 8x8 digits (10 classes), shipped inside scikit-learn, upsampled.
- a directory in ImageFolder layout: DIR/<class name>/<image>.(png|jpg|jpeg|bmp|webp).
- a CIFAR-style `.npz` with `x` (N,H,W,C or N,C,H,W uint8), `y` (N,) and optional `classes`.
Splits are stratified and seeded, so the held-out set is the same for training, export and evaluation.
"""

from __future__ import annotations

import hashlib
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


def _image_folder(root: Path, size: int, channels: int) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UsageError(f"--data {root}: no images found; expected {root}/<class name>/<image>.png|jpg")
    if len(classes) < 2:
        raise UsageError(f"--data {root}: found {len(classes)} class folder(s); classification needs at least 2")
    xs, ys = [], []
    mode = "L" if channels == 1 else "RGB"
    for f, label in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"--data: cannot read image {f} ({e}); remove or fix it") from e
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        xs.append(_fit(t[None], size, channels)[0])
        ys.append(label)
    return ImageData(torch.stack(xs), torch.tensor(ys), classes, str(root))


def _npz(path: Path, size: int, channels: int) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"--data {path}: expected an .npz with arrays 'x' (N,H,W,C uint8) and 'y' (N,): {e}") from e
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise UsageError(f"--data {path}: x has shape {x.shape} and y {y.shape}; need x N,H,W,C and y N")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.is_floating_point():  # floats in [0, 1] or [0, 255]
        t = (t * 255 if float(t.max()) <= 1.0 else t).round().clamp(0, 255)
    elif t.dtype != torch.uint8:
        t = t.clamp(0, 255)
    labels = torch.from_numpy(y.astype(np.int64))
    n_classes = int(labels.max()) + 1
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
