"""Generation timing of an artifact in the ExecuTorch runtime: prefill ms and time to first token (prefill + first
pick), decode ms per token and tokens/s (1000 / median ms); median and p90 (the slow tail) over repeats. The function effai/device_bench can call (not wired yet)."""

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
    prefill, tok_s, vision_ms = [], [], []
    vision, visual = None, None
    if art.manifest["kind"] == "vlm":   # a mid-grey image: timing does not depend on the pixels
        import time

        import torch

        vision, pixels = art.vision(), torch.zeros(1, *art.manifest["image"]["size"])
    for i in range(warmup + repeats):
        if vision is not None:
            t0 = time.perf_counter()
            visual = vision(pixels)
            if i >= warmup:
                vision_ms.append((time.perf_counter() - t0) * 1e3)
        r = generate(dec, ids, s, art.max_seq_len, None, visual)
        if i >= warmup:
            prefill.append(r.prefill_s * 1e3)
            tok_s.append(1e3 * sum(r.decode_s) / max(1, len(r.decode_s)))   # ms per decoded token

    def stats(xs: list[float]) -> dict[str, float]:
        return {"median": round(float(np.median(xs)), 3), "p90": round(float(np.percentile(xs, 90)), 3)}

    return {"artifact": str(path), "precision": art.manifest["precision"], "runtime": dec.runtime,
            "prompt_tokens": len(ids), "new_tokens": s.max_new_tokens, "repeats": repeats,
            "prefill_ms": stats(prefill), "decode_ms_per_token": stats(tok_s),
            "decode_tok_s": round(1e3 / float(np.median(tok_s)), 1),
            "decoder_bytes": (art.path / art.manifest["programs"]["decoder"]).stat().st_size,
            "vision_ms": stats(vision_ms) if vision_ms else None}
