"""Generation timing of an artifact in the ExecuTorch runtime: prefill ms and time to first token (prefill + first
pick), decode tokens/s; median and p90 over repeats. The function effai/device_bench can call (not wired yet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effai.generate import artifact as artifact_mod
from effai.generate.loop import generate
from effai.generate.sampling import Sampling


def bench_generation(path: Path, prompt: str = artifact_mod.PARITY_PROMPT, new_tokens: int = 16, repeats: int = 5,
                     warmup: int = 1) -> dict[str, Any]:
    """Greedy runs that ignore eos (always `new_tokens` tokens, so runs compare); one warm-up run is not counted."""
    art = artifact_mod.read(path)
    ids = art.tokenizer().encode(art.manifest["generation"].get("prompt_template", "{prompt}")
                                 .format(prompt=prompt)).ids
    dec = art.decoder()
    s = Sampling(max_new_tokens=min(new_tokens, art.max_seq_len - len(ids)))
    prefill, tok_s = [], []
    for i in range(warmup + repeats):
        r = generate(dec, ids, s, art.max_seq_len, None)
        if i >= warmup:
            prefill.append(r.prefill_s * 1e3)
            tok_s.append(r.decode_tok_s())

    def stats(xs: list[float]) -> dict[str, float]:
        return {"median": round(float(np.median(xs)), 3), "p90": round(float(np.percentile(xs, 90)), 3)}

    return {"artifact": str(path), "precision": art.manifest["precision"], "runtime": dec.runtime,
            "prompt_tokens": len(ids), "new_tokens": s.max_new_tokens, "repeats": repeats,
            "prefill_ms": stats(prefill), "decode_tok_s": stats(tok_s),
            "decoder_bytes": (art.path / art.manifest["programs"]["decoder"]).stat().st_size}
