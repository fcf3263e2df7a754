"""Visual sentences for DeLVM (Guo et al. 2024, arXiv:2402.04841): real images that ship in packages (scikit-learn
digits upsampled, crops at several scales of scikit-image photos), image-to-image tasks, and sentences of
(input, output) pairs of one task, tokenized by a VQ tokenizer and concatenated:

    <s> in_1 <sep> out_1 <sep> in_2 <sep> out_2          (each image = (size/4)^2 visual tokens)

Head tasks: invert (1 - x), edges (Sobel gradient magnitude), denoise (x + N(0, 0.2^2) -> x). Tail task: threshold
(x > 0.5, binarize), with only a few distinct images (at most 5% of the training pairs). Tail handling (DeLVM's
data-efficiency study): `none` keeps the tail at its natural share; `repeat` oversamples the same few tail pairs to
a head task's share; `augment` oversamples them with the same random geometric transform (one of the 8 dihedral
ones) applied to both images of a pair, so every sampled pair is a new, valid example of the task.
Images are float32 greyscale in [0, 1], H = W = `size`. Spec: docs/delvm.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from effai.errors import UsageError

HEAD_TASKS = ("invert", "edges", "denoise")
TAIL_TASKS = ("threshold",)
TASKS = HEAD_TASKS + TAIL_TASKS
TAIL_MODES = ("augment", "repeat", "none")
TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                "camera")
EVAL_PHOTOS = ("coins", "moon", "clock")
NOISE_STD = 0.2
# special tokens; visual token of code k = N_SPECIAL + k
UNK, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS = ("<unk>", "<s>", "</s>", "<sep>")
N_SPECIAL = len(SPECIALS)


def apply_task(task: str, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) of `task` for images x (N, H, W) in [0, 1]; denoise's noise is seeded."""
    if task == "invert":
        return x, 1.0 - x
    if task == "edges":
        from scipy import ndimage

        gx = ndimage.sobel(x, axis=-1, mode="nearest")
        gy = ndimage.sobel(x, axis=-2, mode="nearest")
        return x, np.clip(np.hypot(gx, gy) / 2.0, 0, 1).astype(np.float32)
    if task == "denoise":
        noise = np.random.default_rng(seed).normal(0, NOISE_STD, x.shape).astype(np.float32)
        return np.clip(x + noise, 0, 1).astype(np.float32), x
    if task == "threshold":
        return x, (x > 0.5).astype(np.float32)
    raise UsageError(f"unknown task '{task}'; choose from: {', '.join(TASKS)}")


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 rotations/flips (k in 0..7) of the last two axes."""
    y = np.rot90(x, k % 4, axes=(-2, -1))
    return np.ascontiguousarray(y[..., ::-1] if k >= 4 else y)


def source_images(split: str, n: int, size: int, seed: int) -> np.ndarray:
    """n greyscale images (N, size, size) in [0, 1]: half scikit-learn digits (8x8 upsampled), half random crops
    (side 1/8 .. 1/2 of the photo, resized) of scikit-image photos; train and eval use different digits and photos."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    if split not in ("train", "eval"):
        raise UsageError(f"split '{split}': choose train or eval")
    rng = np.random.default_rng(seed + (0 if split == "train" else 7919))
    digits = load_digits().images.astype(np.float32) / 16.0
    pool = np.arange(len(digits))[: int(0.8 * len(digits))] if split == "train" else \
        np.arange(len(digits))[int(0.8 * len(digits)):]
    n_d = n // 2
    out = [resize(digits[i], (size, size), order=1, anti_aliasing=False) for i in rng.choice(pool, n_d)]
    photos = [_grey_photo(p) for p in (TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS)]
    for _ in range(n - n_d):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape
        side = int(min(h, w) * rng.uniform(1 / 8, 1 / 2))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        out.append(resize(img[top:top + side, left:left + side], (size, size), order=1, anti_aliasing=True))
    arr = np.clip(np.stack(out), 0, 1).astype(np.float32)
    return arr[rng.permutation(len(arr))]


@functools.lru_cache(maxsize=16)
def _grey_photo(name: str) -> np.ndarray:
    from effai.data.photos import photo

    img = photo(name).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    img.setflags(write=False)
    return img


@dataclass
class PairBank:
    """Tokenized (input, output) pairs per task: tokens[task] = (N, 2, T) int64 visual codes, images[task] =
    (N, 2, H, W) float32; for the tail under `augment`, the 8 dihedral versions of every pair (N, 8, 2, T)."""
    tokens: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    tail_aug: dict[str, np.ndarray]


def build_bank(images: np.ndarray, encode, tail_count: int, seed: int, augment: bool = True) -> PairBank:
    """Every head task on all `images`, the tail task on only `tail_count` of them. `encode`: (N, H, W) float
    [0, 1] -> (N, T) int codes."""
    if len(images) == 0:
        raise UsageError("no images to build visual sentences from; give a non-empty task folder / image count")
    tokens, imgs, aug = {}, {}, {}
    for i, task in enumerate(TASKS):
        x = images if task in HEAD_TASKS else images[:tail_count]
        if len(x) == 0:
            raise UsageError(f"task {task} has no images (tail_count={tail_count}); give at least 2")
        a, b = apply_task(task, x, seed * 31 + i)
        pair = np.stack([a, b], 1)
        imgs[task] = pair
        tokens[task] = np.stack([encode(a), encode(b)], 1)
        if task in TAIL_TASKS and augment:
            aug[task] = np.stack([np.stack([encode(dihedral(a, k)), encode(dihedral(b, k))], 1)
                                  for k in range(8)], 1)
    return PairBank(tokens, imgs, aug)


def sentence(in1: np.ndarray, out1: np.ndarray, in2: np.ndarray, out2: np.ndarray | None = None) -> list[int]:
    """Token ids of one visual sentence (codes shifted by N_SPECIAL); without out2: the prompt, ending in <sep>."""
    ids = [BOS, *(in1 + N_SPECIAL), SEP, *(out1 + N_SPECIAL), SEP, *(in2 + N_SPECIAL), SEP]
    return [int(t) for t in ids] + ([] if out2 is None else [int(t) for t in out2 + N_SPECIAL])


def task_weights(mode: str, tail_share: float) -> dict[str, float]:
    """Sampling probability of each task's sentences under a tail mode."""
    if mode not in TAIL_MODES:
        raise UsageError(f"unknown tail mode '{mode}'; choose from: {', '.join(TAIL_MODES)}")
    tail = tail_share if mode == "none" else 1.0 / len(TASKS)
    head = (1 - tail * len(TAIL_TASKS)) / len(HEAD_TASKS)
    return {t: (head if t in HEAD_TASKS else tail) for t in TASKS}


class SentenceSampler:
    """Seeded batches of training sentences (B, L) int64 from a PairBank under a tail mode."""

    def __init__(self, bank: PairBank, mode: str, tail_share: float, seed: int) -> None:
        self.bank, self.mode = bank, mode
        w = task_weights(mode, tail_share)
        self.tasks = list(w)
        self.p = np.array([w[t] for t in self.tasks])
        self.rng = np.random.default_rng(seed)

    def pair(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        toks = self.bank.tokens[task]
        i = self.rng.integers(len(toks))
        if task in TAIL_TASKS and self.mode == "augment":
            k = self.rng.integers(8)
            return self.bank.tail_aug[task][i, k, 0], self.bank.tail_aug[task][i, k, 1]
        return toks[i, 0], toks[i, 1]

    def batch(self, n: int) -> np.ndarray:
        rows = []
        for t in self.rng.choice(len(self.tasks), n, p=self.p):
            task = self.tasks[t]
            (a, b), (c, d) = self.pair(task), self.pair(task)
            rows.append(sentence(a, b, c, d))
        return np.asarray(rows, np.int64)
