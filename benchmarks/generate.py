"""effai's static-KV-cache ExecuTorch decoder against eager transformers `generate()`, in one run (issue 16).

    python benchmarks/generate.py                        # tiny + wide, fp32 + int8-weight, 32 new tokens, 20 runs
    python benchmarks/generate.py --models tiny --runs 5 # quick look
    python benchmarks/generate.py --reexport             # rebuild the cached artifacts under --out

Models: `tiny` is the LM that ships inside the zoo default (effai/zoo/weights/ademvl_tiny_digits_lm, 2 layers,
hidden 64, loaded with transformers' from_pretrained from that directory); `wide` is a random-init Llama built from
LlamaConfig (hidden 512, 2 layers, vocab 8192: latency does not depend on the weights) with the tiny LM's tokenizer,
saved under --out, so the comparison is not only per-call overhead. Each LM is exported with
effai.generate.artifact.export_artifact (fp32 and int8-weight, static cache of --max-seq-len positions) into --out;
an artifact already there is reused (the first run pays the exports, minutes on a 2-core host).

Then, per model, for the same prompt and the same number of new tokens (greedy, eos ignored so every run has
exactly --new-tokens tokens), --warmup untimed and --runs timed runs, interleaved round-robin so host load hits
every runtime alike:
- eager: transformers `model.generate(ids, max_new_tokens=N, do_sample=False, use_cache=True)` (DynamicCache), on
  a freshly loaded model; time to first token from a streamer's first put() after the prompt;
- torch static: effai's TorchDecoder (the static-cache module that gets exported) driven by effai.generate.loop;
- executorch fp32 / int8-weight: effai's ExecuTorchDecoder (decoder.pte, XNNPACK) driven by effai.generate.loop.
Reported: total ms, time to first token ms, decode ms per token ((time after the first token) / (N-1)) per run, median
and p90 over runs, and tokens/s = 1000 / that at the median and at the p90 (the slow tail, as `effai bench`),
and the ExecuTorch / eager ratio of median totals (< 1: ExecuTorch faster). Tokens: fp32 runtimes must equal eager's
greedy tokens exactly (the script fails otherwise); int8-weight reports its agreement with eager.
torch and the ExecuTorch threadpool both get --threads threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from effai.files import atomic_write  # noqa: E402
from effai.generate import artifact  # noqa: E402
from effai.generate.decoders import TorchDecoder  # noqa: E402
from effai.generate.loop import Result, stream  # noqa: E402
from effai.generate.sampling import Sampling  # noqa: E402

TINY = ROOT / "effai" / "zoo" / "weights" / "ademvl_tiny_digits_lm"
PROMPT = "question : which digit is this ? answer : it is a photo of the digit"
PRECISIONS = ("fp32", "int8-weight")


def write_wide_lm(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A random-init LlamaForCausalLM (seed 0) + the tiny LM's tokenizer files, with save_pretrained."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp)
    for n in artifact.TOKENIZER_FILES:
        if (TINY / n).is_file() and n != "generation_config.json":
            shutil.copyfile(TINY / n, tmp / n)
    tmp.rename(out)
    return out


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives (put #1 is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.t_first = 0, None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def run_eager(lm: Any, ids: list[int], n: int) -> tuple[list[int], float, float]:
    x = torch.tensor([ids])
    s = _FirstToken()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0, streamer=s)
    t1 = time.perf_counter()
    return out[0, len(ids):].tolist(), t1 - t0, s.t_first - t0


def run_loop(dec: Any, ids: list[int], n: int, max_seq_len: int) -> tuple[list[int], float, float]:
    r = Result()
    t0 = time.perf_counter()
    tokens = stream(dec, ids, Sampling(max_new_tokens=n), max_seq_len, None, None, r)
    next(tokens)
    t_first = time.perf_counter()
    for _ in tokens:
        pass
    return r.tokens, time.perf_counter() - t0, t_first - t0


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": float(np.median(xs)), "p90": float(np.percentile(xs, 90))}


def bench_model(key: str, name: str, lm_dir: Path, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from effai.export.kv_decoder import static_cache_module

    arts = {}
    for p in PRECISIONS:
        d = out / f"{key}-{p}"
        if args.reexport or not artifact.is_artifact(d):
            t = time.perf_counter()
            artifact.export_artifact(lm_dir, d, p, args.max_seq_len, Sampling(max_new_tokens=args.new_tokens),
                                     force=True)
            print(f"exported {name} {p} in {time.perf_counter() - t:.0f} s -> {d}", flush=True)
        arts[p] = artifact.read(d)
        if arts[p].max_seq_len != args.max_seq_len:
            raise SystemExit(f"{d} has max_seq_len {arts[p].max_seq_len}, not {args.max_seq_len}; pass --reexport")
    eager_lm, tok = artifact.load_lm(lm_dir)               # DynamicCache, as a user's generate() gets
    static_lm, _ = artifact.load_lm(lm_dir)                # static_cache_module mutates its generation_config
    ids = tok.encode(PROMPT)
    n = min(args.new_tokens, args.max_seq_len - len(ids))
    runners = {"eager transformers generate": lambda: run_eager(eager_lm, ids, n)}
    if not args.no_torch_static:
        dec = TorchDecoder(static_cache_module(static_lm, args.max_seq_len))
        runners["effai loop, torch static cache"] = lambda: run_loop(dec, ids, n, args.max_seq_len)
    for p in PRECISIONS:
        dec_p = arts[p].decoder()
        runners[f"effai loop, ExecuTorch {p}"] = (lambda d: lambda: run_loop(d, ids, n, args.max_seq_len))(dec_p)
    times: dict[str, dict[str, list[float]]] = {k: {"total": [], "ttft": [], "decode": []} for k in runners}
    tokens: dict[str, list[int]] = {}
    for i in range(args.warmup + args.runs):
        for k, fn in runners.items():
            toks, total, ttft = fn()
            if k in tokens and toks != tokens[k]:
                raise SystemExit(f"{name} {k}: greedy tokens changed between runs ({tokens[k]} vs {toks})")
            tokens[k] = toks
            if i >= args.warmup:
                times[k]["total"].append(total * 1e3)
                times[k]["ttft"].append(ttft * 1e3)
                times[k]["decode"].append((total - ttft) * 1e3 / (n - 1))
    ref = tokens["eager transformers generate"]
    rows = []
    eager_total = float(np.median(times["eager transformers generate"]["total"]))
    for k in runners:
        agree = sum(a == b for a, b in zip(ref, tokens[k])) / len(ref)
        if "int8" not in k and tokens[k] != ref:
            raise SystemExit(f"{name} {k}: fp32 greedy tokens differ from eager generate:\n  eager {ref}\n  "
                             f"{k} {tokens[k]}")
        t, dm = stats(times[k]["total"]), stats(times[k]["decode"])
        prec = next((p for p in PRECISIONS if p in k), "fp32")
        rows.append({"model": name, "runtime": k, "precision": prec, "prompt_tokens": len(ids), "new_tokens": n,
                     "total_ms": t, "ttft_ms": stats(times[k]["ttft"]), "decode_ms_per_token": dm,
                     "decode_tok_s": {"median": 1e3 / dm["median"], "p90": 1e3 / dm["p90"]},
                     "ratio_vs_eager": t["median"] / eager_total, "token_agreement_vs_eager": agree,
                     "decoder_bytes": arts[prec].manifest["decoder"]["bytes"] if "ExecuTorch" in k else None})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | runtime | total ms (median / p90) | TTFT ms (median / p90) | decode tok/s (median / p90) "
            "| total / eager | tokens = eager |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['total_ms']['median']:.2f} / {r['total_ms']['p90']:.2f} "
                     f"| {r['ttft_ms']['median']:.2f} / {r['ttft_ms']['p90']:.2f} "
                     f"| {r['decode_tok_s']['median']:,.0f} / {r['decode_tok_s']['p90']:,.0f} "
                     f"| {r['ratio_vs_eager']:.2f}x | {r['token_agreement_vs_eager']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,wide", help="comma list of: tiny, wide")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wide", default="512,2,8192", help="hidden,layers,vocab of the wide random Llama")
    ap.add_argument("--no-torch-static", action="store_true", help="skip effai's torch static-cache decoder")
    ap.add_argument("--reexport", action="store_true", help="rebuild the artifacts under --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "generate"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("tiny", "wide")]
    if bad or not models:
        raise SystemExit(f"--models {args.models!r}: choose from tiny, wide")
    import warnings

    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)

    torch.set_num_threads(args.threads)
    _unsafe_reset_threadpool(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()
    rows = []
    for m in models:
        if m == "tiny":
            lm_dir = TINY
        else:
            h, layers, v = (int(x) for x in args.wide.split(","))
            lm_dir = write_wide_lm(out / f"wide_lm_h{h}_l{layers}_v{v}", h, layers, v)
        name = f"wide random Llama (hidden {h}, {layers} layers, vocab {v})" if m == "wide" else \
            "tiny (ademvl_tiny_digits_lm: hidden 64, 2 layers, vocab 45)"
        rows += bench_model(m if m == "tiny" else lm_dir.name, name, lm_dir, out, args)
        print(table([r for r in rows if r["model"] == name]), flush=True)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    print(f"\n{table(rows)}\n\nwall {wall:.0f} s; load average (1 min) {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
          f"{args.threads} thread(s); prompt {PROMPT!r}", flush=True)
    report = {"rows": rows, "wall_s": wall, "loadavg_start": load0, "loadavg_end": load1, "threads": args.threads,
              "prompt": PROMPT, "runs": args.runs, "warmup": args.warmup, "max_seq_len": args.max_seq_len,
              "argv": sys.argv[1:]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.json), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
