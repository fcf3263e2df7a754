"""Visual question answering data: an offline real-image set (scikit-learn digits, scikit-image photos) whose answers
come from the images, a bounded JSONL + image-folder loader for users' sets, seeded splits by image, and the
Hugging Face tokenizer (a `tokenizers` WordLevel model trained on the templated text, wrapped in
`PreTrainedTokenizerFast`, saved to and loaded from a directory). Spec: docs/ademvl.md.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effai.data.datasets import _fit, read_image
from effai.errors import UsageError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# scikit-image photo -> the answer word for "which photo is this?" (the photos ship inside scikit-image)
PHOTO_WORDS = {"astronaut": "astronaut", "coffee": "coffee", "chelsea": "cat", "rocket": "rocket",
               "immunohistochemistry": "cells", "hubble_deep_field": "galaxies", "colorwheel": "wheel",
               "retina": "retina", "camera": "cameraman", "coins": "coins", "moon": "moon", "clock": "clock"}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
Q_DIGIT = "which digit is this?"
Q_PARITY = "is the digit even or odd?"
Q_PHOTO = "which photo is this?"
Q_BRIGHT = "which quadrant is brightest?"

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
MAX_JSONL_BYTES = 64 << 20          # a user's question file; images are read one by one
MAX_JSONL_ROWS = 200_000
MAX_LINE_BYTES = 64 << 10
MAX_TEXT_CHARS = 1000               # one question or answer


@dataclass
class VQASet:
    """Images (uint8 N,C,H,W at the encoder's size) and questions about them; `group[i]` names what image i shows
    (digit, photo) so splits keep every group on both sides."""

    images: torch.Tensor
    group: list[str]
    items: list[tuple[int, str, str, str]] = field(default_factory=list)   # (image index, question, answer, kind)
    source: str = "offline"

    def __len__(self) -> int:
        return len(self.items)

    def subset_images(self, keep: list[int]) -> VQASet:
        remap = {old: new for new, old in enumerate(keep)}
        items = [(remap[i], q, a, k) for i, q, a, k in self.items if i in remap]
        return VQASet(self.images[keep], [self.group[i] for i in keep], items, self.source)

    def texts(self) -> list[str]:
        """Every templated question + answer: the text the tokenizer and the LM are trained on."""
        return [prompt(q) + " " + a for _, q, a, _ in self.items]


def prompt(question: str) -> str:
    """The one template every model sees: 'question: <q> answer:'; the answer follows it."""
    return f"question: {question.strip().lower()} answer:"


def brightest_quadrant(img: np.ndarray) -> str:
    """The quadrant of a (H, W) luminance image with the highest mean value."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    means = [img[:h, :w].mean(), img[:h, w:].mean(), img[h:, :w].mean(), img[h:, w:].mean()]
    return QUADRANTS[int(np.argmax(means))]


def build_offline(size: int = 64, channels: int = 1, *, photos: bool = True, crops_per_photo: int = 40,
                  seed: int = 0) -> VQASet:
    """The offline VQA set. Digits (1,797 real handwritten digits from scikit-learn): 'which digit is this?' -> the
    digit's word, 'is the digit even or odd?'. Photos (12 from scikit-image, `crops_per_photo` seeded random crops
    each, some mirrored): 'which photo is this?' -> the photo's word, 'which quadrant is brightest?' -> the quadrant
    of the crop (as the encoder sees it) with the highest mean luminance."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    imgs = [_fit(x, size, channels)]
    group = [f"digit:{int(t)}" for t in d.target]
    items = []
    for i, t in enumerate(d.target):
        items.append((i, Q_DIGIT, DIGIT_WORDS[int(t)], "digit"))
        items.append((i, Q_PARITY, "even" if int(t) % 2 == 0 else "odd", "parity"))
    if photos:
        crops, names = _photo_crops(size, crops_per_photo, seed)
        fitted = _fit(crops, size, channels)
        lum = _fit(crops, size, 1)[:, 0].numpy().astype(np.float32)
        base = len(group)
        imgs.append(fitted)
        for j, name in enumerate(names):
            group.append(f"photo:{name}")
            items.append((base + j, Q_PHOTO, PHOTO_WORDS[name], "photo"))
            items.append((base + j, Q_BRIGHT, brightest_quadrant(lum[j]), "quadrant"))
    return VQASet(torch.cat(imgs), group, items, "offline:digits" + ("+photos" if photos else ""))


def _photo_crops(size: int, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n seeded crops (60-100% of the shorter side, any position, half mirrored) of each photo, at size x size."""
    import torch.nn.functional as F

    from effai.data.photos import photo

    rng = np.random.default_rng(seed)
    out, names = [], []
    for name in PHOTO_WORDS:
        img = torch.from_numpy(photo(name)).permute(2, 0, 1).float()[None]   # 1,3,H,W
        h, w = img.shape[-2:]
        for _ in range(n):
            side = int(min(h, w) * rng.uniform(0.6, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = img[..., top:top + side, left:left + side]
            if rng.random() < 0.5:
                crop = crop.flip(-1)
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out.append(crop.round().clamp(0, 255).to(torch.uint8))
            names.append(name)
    return torch.cat(out), names


def split(data: VQASet, val_fraction: float, seed: int) -> tuple[VQASet, VQASet]:
    """Seeded split by IMAGE, stratified by group: no held-out image is ever trained on."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction {val_fraction} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(data.group):
        by_group.setdefault(g, []).append(i)
    train, val = [], []
    for g in sorted(by_group):
        idx = np.array(by_group[g])[rng.permutation(len(by_group[g]))].tolist()
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return data.subset_images(sorted(train)), data.subset_images(sorted(val))


def load_jsonl(path: str | Path, image_root: str | Path | None, size: int, channels: int) -> VQASet:
    """A user's VQA set: one JSON object per line, {"image": "relative/path.png", "question": ..., "answer": ...};
    images are read from `image_root` (default: the JSONL's folder) and may not leave it. Bounded: file size, rows,
    line length, text length, image pixels. Each bad line is a one-line UsageError naming the line and the fix."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file() or not stat.S_ISREG(os.stat(path).st_mode):
        raise UsageError(f"--data {path}: no such JSONL file; give 'digits' or a .jsonl of "
                         '{"image", "question", "answer"} rows')
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist; pass --set image_root=DIR (the folder the JSONL's "
                         "image paths are relative to)")
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise UsageError(f"{path} is over {MAX_JSONL_BYTES >> 20} MB; split it (effai reads at most "
                         f"{MAX_JSONL_ROWS:,} rows)")
    root_real = root.resolve()
    images: list[torch.Tensor] = []
    index: dict[str, int] = {}
    items = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n > MAX_JSONL_ROWS:
                raise UsageError(f"{path} has over {MAX_JSONL_ROWS:,} rows; split it")
            if len(raw) > MAX_LINE_BYTES:
                raise UsageError(f"{path}:{n}: line is over {MAX_LINE_BYTES >> 10} KB; one row is "
                                 '{"image", "question", "answer"}')
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); each line is one "
                                 '{"image", "question", "answer"} object') from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{n}: a JSON {type(row).__name__}, expected an object with image, question, "
                                 "answer")
            missing = [k for k in ("image", "question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
            if missing:
                raise UsageError(f"{path}:{n}: missing or empty {', '.join(missing)}; every row needs string "
                                 "image, question and answer")
            if any(len(row[k]) > MAX_TEXT_CHARS for k in ("question", "answer", "image")):
                raise UsageError(f"{path}:{n}: a field is over {MAX_TEXT_CHARS} characters; shorten it")
            rel = row["image"]
            if rel not in index:
                f = (root / rel)
                if Path(rel).is_absolute() or not str(f.resolve()).startswith(str(root_real) + os.sep):
                    raise UsageError(f"{path}:{n}: image {rel!r} is outside the image folder {root}; use a path "
                                     "relative to it")
                if not f.is_file():
                    raise UsageError(f"{path}:{n}: image {f} does not exist; fix the path or pass --set "
                                     "image_root=DIR")
                arr = read_image(f, "L" if channels == 1 else "RGB", f"{path}:{n}")
                t = torch.from_numpy(arr.copy())
                t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
                index[rel] = len(images)
                images.append(_fit(t, size, channels))
            items.append((index[rel], row["question"].strip(), row["answer"].strip().lower(), "user"))
    if not items:
        raise UsageError(f"{path} holds no rows; each line is one "
                         '{"image": "a.png", "question": "...", "answer": "..."} object')
    by_image: dict[int, str] = {}
    for i, _, a, _ in items:
        by_image.setdefault(i, a)
    group = [f"answer:{by_image[i]}" for i in range(len(images))]
    return VQASet(torch.cat(images), group, items, f"jsonl:{path}")


def load(spec: str, size: int, channels: int, *, image_root: str | None = None, photos: bool = True,
         seed: int = 0) -> VQASet:
    """'digits' (the offline set: digits, plus scikit-image photos unless photos=False) or a .jsonl path."""
    if spec in ("digits", "offline"):
        return build_offline(size, channels, photos=photos, seed=seed)
    if spec.endswith(".jsonl"):
        return load_jsonl(spec, image_root, size, channels)
    raise UsageError(f"--data {spec}: give 'digits' (the offline VQA set) or a .jsonl file of "
                     '{"image", "question", "answer"} rows')


# --- tokenizer ------------------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], out_dir: str | Path) -> object:
    """A word-level Hugging Face tokenizer trained on `texts` (whitespace + punctuation pre-tokenization, <bos> added
    in front), saved with `save_pretrained(out_dir)` so `load_tokenizer(out_dir)` (and transformers' AutoTokenizer)
    read it back."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")     # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values()), min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(SPECIALS["bos_token"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def load_tokenizer(path: str | Path) -> object:
    """The tokenizer saved in a local directory (tokenizer.json + config), or a UsageError naming the fix."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        raise UsageError(f"{p} holds no tokenizer (tokenizer.json); save it there with tokenizer.save_pretrained()")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a damaged directory
        raise UsageError(f"cannot load the tokenizer in {p}: {type(e).__name__}: {str(e).splitlines()[0][:160]}; "
                         "re-save it with save_pretrained()") from None
    if tok.eos_token_id is None:
        raise UsageError(f"the tokenizer in {p} has no end-of-sequence token; set eos_token and re-save it")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
