"""`effai generate ARTIFACT --prompt TEXT`: stream an answer from a generation artifact in the ExecuTorch runtime
(`--prompt-images a,b,c` on a DeLVM artifact: the generated image, effai/cli/delvm.py);
`effai generate-export LM_DIR --out DIR`: make one; `effai generate-bench ARTIFACT`: prefill ms, decode tokens/s.
Details and numbers: docs/generate.md."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError


def generate_cmd(
    artifact: Annotated[Path, typer.Argument(help="A generation artifact dir (effai generate-export), or a DeLVM "
                                                  "artifact dir (effai delvm export).")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (the artifact's template wraps "
                                                  "it); text artifacts.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Image for a vision-language artifact.")] = None,
    prompt_images: Annotated[Optional[str], typer.Option("--prompt-images", help="DeLVM artifacts: a_in.png,a_out.png,"
                                                         "b_in.png (an example pair and the query input).")] = None,
    out_image: Annotated[Optional[Path], typer.Option("--out", "-o", help="DeLVM artifacts: where the generated "
                                                      "image goes [default: b_out.png].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default: the manifest's.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy (default: manifest).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k best (0 = all).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus probability mass.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate text with a static-KV-cache decoder in the ExecuTorch runtime, streaming tokens; prints tokens/s.
    A DeLVM artifact generates an image in context from --prompt-images (effai delvm generate)."""
    from effai.cli import delvm
    from effai.generate import artifact as artifact_mod
    from effai.generate.loop import Result, stream
    from effai.generate.sampling import Sampling

    try:
        if delvm.is_artifact(artifact):
            if prompt_images is None:
                raise UsageError(f"{artifact} is a DeLVM artifact (image in, image out): pass --prompt-images "
                                 "a_in.png,a_out.png,b_in.png [--out b_out.png]")
            bad = [k for k, v in {"--prompt": prompt, "--image": image, "--max-new-tokens": max_new_tokens,
                                  "--temperature": temperature, "--top-k": top_k, "--top-p": top_p,
                                  "--seed": seed}.items() if v is not None]
            if bad:
                raise UsageError(f"{', '.join(bad)}: text-generation options, not used by a DeLVM artifact; drop "
                                 "them (options: --prompt-images, --out, --json)")
        elif prompt_images is not None or out_image is not None:
            raise UsageError(f"{'--prompt-images' if prompt_images is not None else '--out'} is for DeLVM artifacts "
                             f"(effai delvm export); {artifact} is not one: pass --prompt TEXT")
        elif prompt is None:
            raise UsageError("missing --prompt TEXT (or --prompt-images a,b,c for a DeLVM artifact)")
    except EffaiError as e:
        fail(e, as_json)
    if delvm.is_artifact(artifact):
        delvm.run_generate(artifact, prompt_images, out_image or Path("b_out.png"), "executorch", as_json)  # type: ignore[arg-type]
        return
    try:
        if image is not None and not image.is_file():
            raise UsageError(f"image not found: {image}; pass an image file (png, jpg, ...)")
        art = artifact_mod.read(artifact)
        if art.manifest["kind"] == "vlm" and image is None:
            raise UsageError(f"{artifact} is a vision-language artifact: pass --image IMG")
        if art.manifest["kind"] == "lm" and image is not None:
            raise UsageError(f"{artifact} is a text-only artifact (no vision program): drop --image")
        g = {k: v for k, v in art.manifest.get("generation", {}).items() if k in Sampling.__dataclass_fields__}
        given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "seed": seed}
        s = Sampling(**{**g, **{k: v for k, v in given.items() if v is not None}})
        tok = art.tokenizer()
        template = art.manifest.get("generation", {}).get("prompt_template", "{prompt}")
        ids = tok.encode(template.format(prompt=prompt)).ids
        if len(ids) >= art.max_seq_len:
            raise UsageError(f"the prompt is {len(ids)} tokens, the artifact's cache holds {art.max_seq_len}; "
                             f"shorten --prompt or re-export with a larger --max-seq-len")
        visual = art.visual(image) if image is not None else None
        dec = art.decoder()
        r = Result()
        shown = ""
        t0 = time.perf_counter()
        out = console.out()
        for _ in stream(dec, ids, s, art.max_seq_len, art.manifest.get("eos_token_id"), visual, r):
            text = tok.decode(r.tokens, skip_special_tokens=True)
            if not as_json and text.startswith(shown):
                out.print(text[len(shown):], end="", soft_wrap=True, highlight=False)
            shown = text
        total = time.perf_counter() - t0
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        out.print()
        console.err().print(f"[dim]{len(r.tokens)} tokens, prefill {r.prefill_s * 1e3:.1f} ms "
                            f"({len(ids)} tokens), decode {r.decode_tok_s():.1f} tokens/s, {dec.runtime}, "
                            f"stop: {r.stopped}[/]")
    console.json_line({"ok": True, "artifact": str(artifact), "text": shown, "tokens": r.tokens,
                       "prompt_tokens": len(ids), "prefill_ms": round(r.prefill_s * 1e3, 3),
                       "decode_tok_s": round(r.decode_tok_s(), 2), "total_s": round(total, 4),
                       "stopped": r.stopped, "runtime": dec.runtime, "sampling": s.to_dict()})


def generate_export_cmd(
    source: Annotated[str, typer.Argument(help="An LM directory (save_pretrained, with tokenizer.json), an ADEM-VL "
                                               "run directory, or a zoo name such as ademvl_tiny.digits.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The artifact dir to write.")],
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="fp32, int8-weight or int4-weight.")] = "fp32",
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="KV cache positions (prompt + answer).")] = 64,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Default answer length.")] = 32,
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template", help="Wraps the prompt [default: "
                                                           "{prompt} for an LM, 'question: {prompt} answer:' for "
                                                           "ADEM-VL].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export an LM as a static-KV-cache ExecuTorch decoder (XNNPACK) with its tokenizer; checks greedy parity."""
    run_generation_export(source, out, quantize, max_seq_len, max_new_tokens, prompt_template, force, as_json)


def run_generation_export(source: str, out: Path, quantize: str, max_seq_len: int, max_new_tokens: int,
                          prompt_template: str | None, force: bool, as_json: bool) -> dict[str, Any]:
    """`effai generate-export` and `effai export --target executorch` of a generative model: export, one summary line,
    the JSON line (returned too, for callers in process); usage errors exit 2 before the model is loaded
    (effai.generate.artifact.export_source)."""
    from effai.generate.artifact import export_source

    try:
        with console.err().status(f"exporting {source} ({quantize}, cache {max_seq_len})", spinner="dots") \
                if not as_json else nullcontext():
            m = export_source(source, out, quantize, max_seq_len, max_new_tokens, prompt_template, force)
    except EffaiError as e:
        fail(e, as_json)
    p = m["parity"]
    files = [m["programs"]["decoder"]] + ([m["programs"]["vision"]] if m["programs"].get("vision") else [])
    if not as_json:
        console.out().print(f"wrote {out} ({m['kind']}: {' + '.join(files)} + tokenizer): decoder "
                            f"{m['decoder']['bytes'] / 1e6:.2f} MB ({quantize}), greedy token agreement with torch "
                            f"fp32 {p['token_agreement']:.0%} over {len(p['torch_tokens'])}")
    summary = {"ok": True, "artifact": str(out), "kind": m["kind"], "precision": quantize, "parity": p,
               "decoder_bytes": m["decoder"]["bytes"], "programs": m["programs"]}
    console.json_line(summary)
    return summary


def generate_bench_cmd(
    artifact: Annotated[Path, typer.Argument(help="A generation artifact dir.")],
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per run.")] = 16,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs (after one warm-up).")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Time to first token, prefill ms, decode tokens/s (median, p90), sizes and peak memory of a generation
    artifact in the ExecuTorch runtime (also `effai bench ARTIFACT`)."""
    run_generation_bench([artifact], new_tokens, repeats, 1, as_json)


def run_generation_bench(artifacts: list[Path], new_tokens: int, repeats: int, warmup: int,
                         as_json: bool) -> list[dict[str, Any]]:
    """`effai generate-bench` and `effai bench` of generation artifacts: measure each (effai.generate.bench), print
    the table and the JSON line {"ok", "generation": [rows], "memory_method"}; returns the rows."""
    from effai.generate.bench import MEMORY_METHOD, bench_generation

    rows = []
    try:
        if repeats < 1 or new_tokens < 1 or warmup < 0:
            raise UsageError("--repeats/--runs and --new-tokens must be >= 1, --warmup >= 0")
        for a in artifacts:
            rows.append(bench_generation(a, new_tokens=new_tokens, repeats=repeats, warmup=warmup))
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        for r in rows:
            console.out().print(_bench_table(r))
        console.err().print(f"[dim]median (p90) over {repeats} run(s) of {rows[0]['new_tokens']} greedy tokens after "
                            f"{warmup} warm-up; tokens/s p90: the rate at the p90 ms/token (slow tail); peak memory: "
                            f"{MEMORY_METHOD}[/]")
    console.json_line({"ok": True, "generation": rows, "memory_method": MEMORY_METHOD})
    return rows


def bench_dispatch(artifacts: list[Path], runs: int, warmup: int, not_used: dict[str, Any], as_json: bool) -> bool:
    """`effai bench` on generation artifacts (effai.generate/1 manifests): run_generation_bench with --runs timed
    generations after --warmup; False when none is one (the single-forward bench runs). A mix, another device or an
    option of the single-forward bench is refused before anything runs."""
    from effai.cli import delvm
    from effai.generate.artifact import is_artifact

    gen = [a for a in artifacts if is_artifact(a)]
    images = [a for a in artifacts if delvm.is_artifact(a)]    # DeLVM: image tokens/s, ms per generated image
    if not gen and not images:
        return False
    try:
        if gen and images:
            raise UsageError(f"{images[0]} is a DeLVM artifact and {gen[0]} a text generation artifact; bench them "
                             "in separate effai bench calls")
        gen = gen or images
        if len(gen) != len(artifacts):
            other = next(a for a in artifacts if a not in gen)
            raise UsageError(f"{other} is not a {'DeLVM' if images else 'generation'} artifact but {gen[0]} is; "
                             "bench them in separate effai bench calls")
        bad = [k for k, v in not_used.items() if v]
        if bad:
            raise UsageError(f"{', '.join(bad)}: not available for generation artifacts (measured on this host in the "
                             "ExecuTorch runtime); drop them (options: --runs, --warmup, --json)")
    except EffaiError as e:
        fail(e, as_json)
    if images:
        delvm.run_bench(images, runs, warmup, as_json)
    else:
        run_generation_bench(gen, 16, runs, warmup, as_json)
    return True


def _bench_table(r: dict[str, Any]) -> Any:
    """One artifact's numbers as metric | median | p90 rows (fits 80 columns whatever the artifact's path)."""
    from rich.table import Table

    table = Table(title=f"effai bench: {r['artifact']} ({r['kind']}, {r['precision']}, {r['runtime']}, this host)")
    for col in ("metric", "median", "p90"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    def row(name: str, x: dict[str, float] | None, fmt: str = "{:.3f}") -> None:
        if x is not None:
            table.add_row(name, fmt.format(x["median"]), fmt.format(x["p90"]))

    row("time to first token (ms)" + (" incl. vision" if r["vision_ms"] else ""), r["ttft_ms"])
    row(f"prefill (ms, {r['prompt_tokens']} tokens)", r["prefill_ms"])
    row("vision program (ms)", r["vision_ms"])
    row("decode (ms/token)", r["decode_ms_per_token"])
    row("decode (tokens/s)", r["decode_tok_s"], "{:.1f}")
    vision = f" + vision {r['vision_bytes'] / 1e6:.2f}" if r["vision_bytes"] else ""
    table.add_row(f"files (MB): decoder {r['decoder_bytes'] / 1e6:.2f}{vision}", f"{r['artifact_bytes'] / 1e6:.2f}",
                  "-")
    table.add_row(f"peak memory (MB RSS): +{r['rss_rise_bytes'] / 1e6:.0f} for the artifact",
                  f"{r['peak_rss_bytes'] / 1e6:.0f}", "-")
    return table


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("generate-export")(generate_export_cmd)
    app.command("generate-bench")(generate_bench_cmd)
