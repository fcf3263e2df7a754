"""`effai delvm export RUN --out DIR`: a DeLVM run (effai train delvm) -> a DeLVM artifact dir: lm/ (the visual-token
LM as a static-KV-cache ExecuTorch decoder, effai.generate.artifact), vq_encoder-<target>/ and vq_decoder-<target>/
(the tokenizer's conv nets through effai's export pipeline, parity in each runtime), codebook.npy and delvm.json.
`effai delvm generate DIR --prompt-images a_in.png,a_out.png,b_in.png --out b_out.png`: in-context image-to-image
generation in the ExecuTorch runtime; prints the written image's path, image tokens/s and time per image.
Method and numbers: docs/delvm.md."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError

SCHEMA = "effai.delvm/1"
VQ_TARGETS = ("executorch", "onnx", "tflite", "coreml")
delvm_app = typer.Typer(no_args_is_help=True, help="DeLVM: in-context image-to-image generation with visual tokens.")


BUNDLED = "delvm_tiny"   # the shipped default: effai/zoo/weights/delvm_tiny_vq.safetensors + delvm_tiny_lm/


def run_paths(run: Path | str) -> tuple[Path, Path]:
    """(vq.safetensors, LM dir) of a run dir, or of the shipped default when run is 'delvm_tiny'."""
    if str(run) == BUNDLED:
        from effai.zoo.vq import WEIGHTS_DIR

        return WEIGHTS_DIR / "delvm_tiny_vq.safetensors", WEIGHTS_DIR / "delvm_tiny_lm"
    return Path(run) / "vq.safetensors", Path(run) / "lm"


def is_artifact(path: Path | str) -> bool:
    """Does `path` look like a DeLVM artifact dir (a delvm.json naming this schema)? DelvmArtifact checks it in full."""
    from effai.files import names_schema

    return names_schema(Path(path) / "delvm.json", SCHEMA)


def is_source(source: str) -> bool:
    """A DeLVM model to export: a zoo card of task image-to-image-in-context, or a run dir (vq.safetensors + lm/)."""
    from effai.zoo.catalog import CARDS

    if source in CARDS:
        return CARDS.get(source).task == "image-to-image-in-context"
    p = Path(source)
    return (p / "vq.safetensors").is_file() and (p / "lm" / "config.json").is_file()


def export_refusal(source: str) -> UsageError:
    """`effai export` of a DeLVM model: its parts (tokenizer nets on each target + a KV-cache decoder) export with
    `effai delvm export`, which the single-forward pipeline does not replace."""
    return UsageError(f"{source} is an image-to-image-in-context model (VQ tokenizer + visual-token LM): export it "
                      f"with `effai delvm export {source} --out DIR` (--targets executorch,onnx,tflite,coreml for "
                      "the tokenizer, --precision fp32|int8-weight|int4-weight for the LM)")


def export_delvm(run: Path | str, out: Path, precision: str = "fp32", targets: tuple[str, ...] = VQ_TARGETS,
                 force: bool = False) -> dict[str, Any]:
    """A run dir (vq.safetensors + lm/) -> artifact dir at `out`, built in a staging dir and renamed into place."""
    import torch

    from effai import api
    from effai.data import visual_sentences as vs
    from effai.files import atomic_write, file_entries, replace_dir, staging_dir
    from effai.generate.artifact import export_artifact
    from effai.zoo import vq as zvq

    vq_file, lm_dir = run_paths(run)
    out = Path(out)
    if not vq_file.is_file() or not (lm_dir / "config.json").is_file():
        raise UsageError(f"{run} is not a DeLVM run (needs vq.safetensors and lm/); train one with effai train delvm "
                         f"or pass {BUNDLED} (the shipped default)")
    bad = [t for t in targets if t not in VQ_TARGETS]
    if bad or not targets:
        raise UsageError(f"unknown target '{bad[0] if bad else ''}'; choose from: {', '.join(VQ_TARGETS)}")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it or choose another --out")
    vq = zvq.load(vq_file)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(lm_dir), local_files_only=True).vocab_size
    if vocab != vs.N_SPECIAL + vq.config.codebook:
        raise UsageError(f"{run}: the LM's vocabulary ({vocab}) does not match the tokenizer's codebook "
                         f"({vq.config.codebook} + {vs.N_SPECIAL} specials); retrain the LM on this tokenizer")
    c = vq.config
    max_seq_len = 4 * c.tokens + 4 + 4
    tmp = staging_dir(out)
    try:
        lm_manifest = export_artifact(lm_dir, tmp / "lm", precision=precision, max_seq_len=max_seq_len)
        parts = {}
        for name, module, shape in (("vq_encoder", vq.encoder, (1, c.channels, c.size, c.size)),
                                    ("vq_decoder", vq.decoder, (1, c.dim, c.grid, c.grid))):
            for target in targets:
                res = api.export(module.eval(), target, input_shape=shape, out=tmp / f"{name}-{target}",
                                 name=f"delvm_{name}", mean=(0.0,) * shape[1], std=(1.0,) * shape[1], eval="none",
                                 force=True)
                parts[f"{name}-{target}"] = {"parity": _short(getattr(res, "parity", None))}
        np.save(tmp / "codebook.npy", vq.codebook.detach().numpy().astype(np.float32))
        spec = {"schema": SCHEMA, "size": c.size, "channels": c.channels, "grid": c.grid, "tokens_per_image": c.tokens,
                "codebook": c.codebook, "code_dim": c.dim, "specials": list(vs.SPECIALS), "bos": vs.BOS, "sep": vs.SEP,
                "pixels": "x / 127.5 - 1 (the encoder's input; the decoder's output likewise)",
                "lm": "lm", "precision": precision, "targets": list(targets), "parts": parts,
                "lm_parity": lm_manifest["parity"]}
        spec["files"] = file_entries(tmp, ("delvm.json",))
        atomic_write(tmp / "delvm.json", json.dumps(spec, indent=2, default=str) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del torch
    return spec


def _short(parity: Any) -> Any:
    if isinstance(parity, dict):
        return {k: v for k, v in parity.items() if isinstance(v, (int, float, str, bool))}
    return str(parity)[:200] if parity is not None else None


class DelvmArtifact:
    """A DeLVM artifact dir loaded for generation: encoder and decoder in their runtime (ExecuTorch by default),
    the decoder LM in ExecuTorch, the nearest-code lookup in numpy."""

    def __init__(self, path: Path, target: str = "executorch") -> None:
        from effai import api
        from effai.files import read_json
        from effai.generate import artifact as gen

        path = Path(path)
        if not (path / "delvm.json").is_file():
            raise UsageError(f"{path} is not a DeLVM artifact (no delvm.json); make one with effai delvm export")
        self.spec = read_json(path / "delvm.json")
        if not isinstance(self.spec, dict) or self.spec.get("schema") != SCHEMA:
            raise UsageError(f"{path}/delvm.json is not an {SCHEMA} file; re-export with effai delvm export")
        if target not in self.spec["targets"]:
            raise UsageError(f"{path} holds no {target} tokenizer; choose from: {', '.join(self.spec['targets'])}")
        self.path = path
        self.codebook = np.load(path / "codebook.npy", allow_pickle=False)
        self.encoder = api.load_artifact(path / f"vq_encoder-{target}")
        self.decoder = api.load_artifact(path / f"vq_decoder-{target}")
        self.lm = gen.read(path / self.spec["lm"])
        if self.lm.manifest["vocab_size"] != len(self.spec["specials"]) + len(self.codebook):
            raise UsageError(f"{path}: the LM's vocabulary does not match the codebook; re-export the artifact")

    def read_image(self, f: Path) -> np.ndarray:
        from effai.data.datasets import read_image

        s = int(self.spec["size"])
        if not Path(f).is_file():
            raise UsageError(f"image not found: {f}; pass existing image files")
        arr = read_image(Path(f), "L" if self.spec["channels"] == 1 else "RGB", "--prompt-images")
        if arr.shape[:2] != (s, s):
            raise UsageError(f"{f} is {arr.shape[1]}x{arr.shape[0]}, this artifact takes {s}x{s} images; resize it")
        return arr.astype(np.float32) / 255.0

    def tokens(self, img: np.ndarray) -> np.ndarray:
        """(H, W) [0, 1] -> (T,) codes: encoder in its runtime, then the nearest codebook vector."""
        x = (img * 2 - 1).reshape(1, 1, *img.shape).astype(np.float32)
        z = self.encoder.run(x)[0][0]                                # (D, h, w)
        flat = z.reshape(z.shape[0], -1).T                           # (T, D)
        d = (flat ** 2).sum(1, keepdims=True) - 2 * flat @ self.codebook.T + (self.codebook ** 2).sum(1)[None]
        return d.argmin(1)

    def image(self, codes: np.ndarray) -> np.ndarray:
        g = int(self.spec["grid"])
        z = self.codebook[codes].T.reshape(1, -1, g, g).astype(np.float32)
        return np.clip((self.decoder.run(z)[0][0, 0] + 1) / 2, 0, 1)

    def generate(self, a_in: np.ndarray, a_out: np.ndarray, b_in: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        from effai.data import visual_sentences as vs

        t0 = time.perf_counter()
        prompt = vs.sentence(self.tokens(a_in), self.tokens(a_out), self.tokens(b_in))
        dec = self.lm.decoder()
        n = int(self.spec["tokens_per_image"])
        t1 = time.perf_counter()
        logits = dec.step(prompt, 0)
        codes = []
        for i in range(n):
            k = int(np.argmax(logits[vs.N_SPECIAL:]))
            codes.append(k)
            if i + 1 < n:
                logits = dec.step([k + vs.N_SPECIAL], len(prompt) + i)
        t2 = time.perf_counter()
        img = self.image(np.asarray(codes))
        t3 = time.perf_counter()
        return img, {"image_tokens": n, "image_tokens_per_s": round(n / (t2 - t1), 1),
                     "lm_s": round(t2 - t1, 4), "tokenize_s": round(t1 - t0, 4), "detokenize_s": round(t3 - t2, 4),
                     "time_per_image_s": round(t3 - t0, 4), "codes": codes}


def write_png(img: np.ndarray, out: Path) -> None:
    import io

    from PIL import Image

    from effai.files import atomic_write

    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(buf, format="PNG")
    atomic_write(Path(out), buf.getvalue())


def parse_prompt_images(text: str) -> list[Path]:
    files = [Path(p.strip()) for p in text.split(",") if p.strip()]
    if len(files) != 3:
        raise UsageError(f"--prompt-images takes 3 images (a_in,a_out,b_in), got {len(files)}; an example pair "
                         "and one query input")
    return files


def run_generate(artifact: Path, prompt_images: str, out: Path, target: str, as_json: bool) -> dict[str, Any]:
    """`effai delvm generate` and `effai generate` of a DeLVM artifact: generate, write the PNG (atomically, only
    after every input was read), print it and the JSON line; returns the JSON line's dict."""
    try:
        files = parse_prompt_images(prompt_images)
        art = DelvmArtifact(artifact, target)
        imgs = [art.read_image(f) for f in files]
        img, stats = art.generate(*imgs)
        write_png(img, out)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        console.out().print(f"[green]✓[/] wrote {out}  ({stats['image_tokens']} image tokens, "
                            f"{stats['image_tokens_per_s']} tokens/s, {stats['time_per_image_s'] * 1e3:.0f} ms per "
                            "image)")
        console.out().print(str(out.resolve()))
    res = {"ok": True, "out": str(out), **{k: v for k, v in stats.items() if k != "codes"}}
    console.json_line(res)
    return res


def bench_delvm(path: Path, repeats: int = 20, warmup: int = 1) -> dict[str, Any]:
    """Generation timing of a DeLVM artifact on this host (encoder/decoder and LM decoder in ExecuTorch): per image,
    tokenize the 3 prompt images + T greedy LM steps + detokenize; image tokens/s = T / LM seconds. Fixed seeded
    images (timing does not depend on the pixels), median and p90 over `repeats` after `warmup`."""
    art = DelvmArtifact(path)
    s = int(art.spec["size"])
    rng = np.random.default_rng(0)
    imgs = [rng.random((s, s)).astype(np.float32) for _ in range(3)]
    per_image, tok_s, lm_ms = [], [], []
    for i in range(warmup + repeats):
        _, st = art.generate(*imgs)
        if i >= warmup:
            per_image.append(st["time_per_image_s"] * 1e3)
            lm_ms.append(st["lm_s"] * 1e3)
            tok_s.append(st["image_tokens"] / st["lm_s"])

    def stats(xs: list[float], slow_high: bool = True) -> dict[str, float]:
        return {"median": round(float(np.median(xs)), 3 if slow_high else 1),
                "p90": round(float(np.percentile(xs, 90 if slow_high else 10)), 3 if slow_high else 1)}

    return {"artifact": str(path), "kind": "delvm", "precision": art.spec["precision"], "runtime": "executorch",
            "image_tokens": int(art.spec["tokens_per_image"]), "repeats": repeats, "warmup": warmup,
            "ms_per_image": stats(per_image), "lm_ms_per_image": stats(lm_ms),
            "image_tokens_per_s": stats(tok_s, slow_high=False),
            "decoder_bytes": (art.lm.path / art.lm.manifest["programs"]["decoder"]).stat().st_size,
            "artifact_bytes": sum(int(e["bytes"]) for e in art.spec["files"]) + (art.path / "delvm.json").stat().st_size}


def run_bench(artifacts: list[Path], repeats: int, warmup: int, as_json: bool) -> list[dict[str, Any]]:
    """`effai bench` of DeLVM artifacts: bench_delvm each, a table per artifact, the JSON line {"ok", "delvm"}."""
    rows = []
    try:
        if repeats < 1 or warmup < 0:
            raise UsageError("--runs must be >= 1 and --warmup >= 0")
        rows = [bench_delvm(a, repeats, warmup) for a in artifacts]
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        from rich.table import Table

        for r in rows:
            t = Table(title=f"effai bench: {r['artifact']} (DeLVM, LM {r['precision']}, ExecuTorch)")
            for col in ("metric", "median", "p90"):
                t.add_column(col, justify="left" if col == "metric" else "right")
            t.add_row("time per generated image (ms)", f"{r['ms_per_image']['median']:.2f}",
                      f"{r['ms_per_image']['p90']:.2f}")
            t.add_row(f"LM decode (ms, {r['image_tokens']} tokens)", f"{r['lm_ms_per_image']['median']:.2f}",
                      f"{r['lm_ms_per_image']['p90']:.2f}")
            t.add_row("image tokens/s", f"{r['image_tokens_per_s']['median']:.0f}",
                      f"{r['image_tokens_per_s']['p90']:.0f}")
            t.add_row(f"files (MB): decoder {r['decoder_bytes'] / 1e6:.2f}", f"{r['artifact_bytes'] / 1e6:.2f}", "-")
            console.out().print(t)
        console.err().print(f"[dim]median (p90) over {repeats} generated image(s) after {warmup} warm-up; per image: "
                            "tokenize 3 prompt images + greedy LM decode + detokenize; tokens/s p90: the slow tail[/]")
    console.json_line({"ok": True, "delvm": rows})
    return rows


@delvm_app.command("generate")
def generate_cmd(
    artifact: Annotated[Path, typer.Argument(help="A DeLVM artifact dir (effai delvm export).")],
    prompt_images: Annotated[str, typer.Option("--prompt-images", help="a_in.png,a_out.png,b_in.png: an example "
                                               "pair and the query input (greyscale, the artifact's size).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the generated b_out.png goes.")] = Path("b_out.png"),
    target: Annotated[str, typer.Option(help="Runtime of the VQ encoder/decoder: executorch | onnx | tflite.")] = "executorch",
    as_json: JsonOpt = False,
) -> None:
    """Generate the query's output image in context (example pair + query input), in the ExecuTorch runtime
    (also `effai generate ARTIFACT --prompt-images ...`)."""
    run_generate(artifact, prompt_images, out, target, as_json)


@delvm_app.command("export")
def export_cmd(
    run: Annotated[str, typer.Argument(help="A DeLVM run dir (effai train delvm), or delvm_tiny (shipped).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The artifact dir to write.")],
    precision: Annotated[str, typer.Option(help="The LM decoder's precision: fp32 | int8-weight | int4-weight.")] = "fp32",
    targets: Annotated[str, typer.Option(help="Comma list of tokenizer targets.")] = ",".join(VQ_TARGETS),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a DeLVM run: the LM as an ExecuTorch KV-cache decoder, the VQ encoder/decoder to each target."""
    try:
        spec = export_delvm(run, out, precision, tuple(t.strip() for t in targets.split(",") if t.strip()), force)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        console.out().print(f"[green]✓[/] wrote {out} (LM {precision}, tokenizer: {', '.join(spec['targets'])}); "
                            f"LM greedy parity identical: {spec['lm_parity']['identical']}")
    console.json_line({"ok": True, "out": str(out), "lm_parity": spec["lm_parity"], "parts": spec["parts"]})


def register(app: typer.Typer) -> None:
    app.add_typer(delvm_app, name="delvm")
