"""Next-token choice: greedy, or temperature / top-k / top-p (nucleus, Holtzman et al. 2020) sampling from a seeded
numpy generator, so a seed gives the same tokens in every runtime whose logits agree."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from effai.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax). Otherwise p_i = softmax(z_i / temperature) over the top_k logits (0 = all),
    cut to the smallest set whose probability reaches top_p, renormalized, and drawn with numpy's PCG64(seed)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} must be >= 0 (0 = no cut)")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """One token id from a (V,) logits vector."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if s.temperature == 0:
        return int(np.argmax(z))
    z = z / s.temperature
    order = np.argsort(-z, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if s.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])
