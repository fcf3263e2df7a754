"""DeViT's decomposition by class subsets (Xu et al., arXiv:2309.05015; falcon-xu/DeViT splite_dataset.py):
    perm     = list(range(K)) shuffled by Python's `random` seeded with `seed`     (random.seed(42) in the paper)
    subset i = perm[i*K//N : (i+1)*K//N], the last one perm[(N-1)*K//N :]        (sizes differ by at most one)
`split_hash` is written into every part and the fusion head, so parts of different decompositions are never
combined. Details: docs/distill.md, "effai/train/devit/split.py".
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from effai.errors import UsageError


@dataclass(frozen=True)
class ClassSplit:
    subsets: tuple[tuple[int, ...], ...]   # global class ids of each part, sorted
    seed: int

    @property
    def parts(self) -> int:
        return len(self.subsets)

    @property
    def num_classes(self) -> int:
        return sum(len(s) for s in self.subsets)

    @property
    def hash(self) -> str:
        return split_hash(self.subsets, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "seed": self.seed, "subsets": [list(s) for s in self.subsets],
                "split_hash": self.hash}


def split_classes(num_classes: int, parts: int, seed: int = 42) -> ClassSplit:
    """The reference's partition: class ids shuffled by `random.Random(seed)`, cut at i * K // N."""
    if parts < 1:
        raise UsageError(f"--parts {parts}: a decomposition needs at least 1 part")
    if parts > num_classes:
        raise UsageError(f"--parts {parts} is more than the data's {num_classes} classes (each part needs at least "
                         f"one class of its own); choose --parts between 1 and {num_classes}")
    perm = list(range(num_classes))
    random.Random(seed).shuffle(perm)      # = random.seed(seed); random.shuffle(perm), without the global state
    cuts = [i * num_classes // parts for i in range(parts)] + [num_classes]
    chunks = [perm[a:b] for a, b in zip(cuts, cuts[1:])]
    return ClassSplit(tuple(tuple(sorted(int(c) for c in chunk)) for chunk in chunks), seed)


def split_hash(subsets: tuple[tuple[int, ...], ...] | list[list[int]], seed: int) -> str:
    """sha256 over the sorted subsets (each sorted), their number and the seed: the decomposition's identity."""
    canon = sorted(sorted(int(c) for c in s) for s in subsets)
    text = json.dumps({"subsets": canon, "parts": len(canon), "seed": int(seed)}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
