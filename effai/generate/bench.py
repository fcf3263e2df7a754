"""Generation timing of an artifact in the ExecuTorch runtime, the numbers `effai bench` and `effai generate-bench`
report for a generation artifact (effai.generate/1, kind lm or vlm):

- time to first token (TTFT): from the image (vlm: the vision program) or the prompt to the first picked token,
  i.e. vision + prefill of the prompt + the first pick;
- prefill ms: the decoder's one step over the prompt tokens;
- decode ms per token over every decode step of every timed run, and tokens/s = 1000 / ms per token at the median
  and at the p90 ms (the slow tail: p90 tokens/s is the rate 10% of the steps fall below);
- file sizes, and peak memory as the process's resident-set high-water mark (resource.getrusage ru_maxrss, which
  counts native allocations of the runtime; tracemalloc would see Python objects only): the peak of the whole
  process (Python + torch + runtime) and its rise while the artifact was loaded and run (the runtimes are
  imported before the baseline).

Greedy runs that ignore eos (always `new_tokens` tokens, so runs compare); `warmup` untimed runs first.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from effai.generate import artifact as artifact_mod
from effai.generate.loop import Result, stream
from effai.generate.sampling import Sampling

MEMORY_METHOD = "ru_maxrss (resident-set high-water mark of this process, native memory included)"


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def bench_generation(path: Path, prompt: str = artifact_mod.PARITY_PROMPT, new_tokens: int = 16, repeats: int = 5,
                     warmup: int = 1) -> dict[str, Any]:
    import torch  # noqa: F401 - the runtimes are loaded before the baseline, so the rise is the artifact's own
    from effai.export.quiet import runtime_quiet

    with runtime_quiet():      # the runtime's import and threadpool lines are not the bench's output
        from executorch.runtime import Runtime

        Runtime.get()
    rss_before = peak_rss_bytes()
    art = artifact_mod.read(path)
    ids = art.tokenizer().encode(art.manifest["generation"].get("prompt_template", "{prompt}")
                                 .format(prompt=prompt)).ids
    s = Sampling(max_new_tokens=max(1, min(new_tokens, art.max_seq_len - len(ids))))
    dec = art.decoder()
    vision, pixels = None, None
    if art.manifest["kind"] == "vlm":   # a mid-grey image: timing does not depend on the pixels
        vision, pixels = art.vision(), torch.zeros(1, *art.manifest["image"]["size"])
    ttft, prefill, vision_ms, step_ms = [], [], [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        visual = vision(pixels) if vision is not None else None
        t_vision = time.perf_counter()
        r = Result()
        tokens = stream(dec, ids, s, art.max_seq_len, None, visual, r)
        next(tokens)
        t_first = time.perf_counter()
        for _ in tokens:
            pass
        if i >= warmup:
            ttft.append((t_first - t0) * 1e3)
            vision_ms.append((t_vision - t0) * 1e3)
            prefill.append(r.prefill_s * 1e3)
            step_ms.extend(d * 1e3 for d in r.decode_s)

    def stats(xs: list[float]) -> dict[str, float] | None:
        if not xs:
            return None
        return {"median": round(float(np.median(xs)), 3), "p90": round(float(np.percentile(xs, 90)), 3)}

    per_token = stats(step_ms)
    programs = {k: v for k, v in art.manifest["programs"].items() if v}
    sizes = {k: (art.path / v).stat().st_size for k, v in programs.items()}
    peak = peak_rss_bytes()
    return {"artifact": str(path), "kind": art.manifest["kind"], "precision": art.manifest["precision"],
            "runtime": dec.runtime, "prompt_tokens": len(ids), "new_tokens": s.max_new_tokens, "repeats": repeats,
            "warmup": warmup, "ttft_ms": stats(ttft), "prefill_ms": stats(prefill),
            "vision_ms": stats(vision_ms) if vision is not None else None, "decode_ms_per_token": per_token,
            "decode_tok_s": None if per_token is None else
            {"median": round(1e3 / per_token["median"], 1), "p90": round(1e3 / per_token["p90"], 1)},
            "decoder_bytes": sizes["decoder"], "vision_bytes": sizes.get("vision"),
            "artifact_bytes": sum(f["bytes"] for f in art.manifest["files"]),
            "peak_rss_bytes": peak, "rss_rise_bytes": peak - rss_before, "memory_method": MEMORY_METHOD}
