"""The generation loop: one prefill step over the prompt, then one decode step per token until eos, the token
budget or the cache end; yields each token with its time, so callers stream and time it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from effai.errors import UsageError
from effai.generate.sampling import Sampling, pick


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)   # one per decode step
    stopped: str = ""                                       # eos | max_new_tokens | cache_full

    def decode_tok_s(self) -> float:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else 0.0


def stream(decoder: Any, prompt: list[int], s: Sampling, max_seq_len: int, eos: int | None,
           visual: Any = None, result: Result | None = None) -> Iterator[int]:
    """Tokens one by one; `result` (when given) collects the tokens and timings."""
    if not prompt:
        raise UsageError("the prompt encodes to no tokens; pass a non-empty --prompt")
    if len(prompt) >= max_seq_len:
        raise UsageError(f"the prompt is {len(prompt)} tokens, the artifact's cache holds {max_seq_len}; shorten "
                         f"--prompt to at most {max_seq_len - 1} tokens or re-export with a larger --max-seq-len")
    r = result if result is not None else Result()
    rng = np.random.default_rng(s.seed)
    t0 = time.perf_counter()
    logits = decoder.step(prompt, 0, visual)
    r.prefill_s = time.perf_counter() - t0
    pos = len(prompt)
    while True:
        tok = pick(logits, s, rng)
        r.tokens.append(tok)
        yield tok
        if eos is not None and tok == eos:
            r.stopped = "eos"
            return
        if len(r.tokens) >= s.max_new_tokens:
            r.stopped = "max_new_tokens"
            return
        if pos >= max_seq_len:
            r.stopped = "cache_full"
            return
        t0 = time.perf_counter()
        logits = decoder.step([tok], pos, visual)
        r.decode_s.append(time.perf_counter() - t0)
        pos += 1


def generate(decoder: Any, prompt: list[int], s: Sampling, max_seq_len: int, eos: int | None,
             visual: Any = None) -> Result:
    r = Result()
    for _ in stream(decoder, prompt, s, max_seq_len, eos, visual, r):
        pass
    return r
