"""Generation artifact dirs: decoder.pte (static KV cache), the tokenizer files, manifest.json (schema
effai.generate/1: files with sha256, programs, max_seq_len, generation settings, eos id, export-time parity).
Built in a staging dir and renamed into place, so a failed export leaves nothing half-written."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effai import files
from effai.errors import EffaiError, UsageError
from effai.generate.sampling import Sampling

SCHEMA = "effai.generate/1"
MANIFEST = "manifest.json"
KINDS = ("lm", "vlm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
PARITY_PROMPT = "which digit is this ?"


def load_lm(lm_dir: Path) -> tuple[Any, Any]:
    """(causal LM, fast tokenizer) from a local directory; one-line usage errors for what is missing or wrong."""
    lm_dir = Path(lm_dir)
    if not (lm_dir / "config.json").is_file():
        raise UsageError(f"{lm_dir} has no config.json: pass a directory written by save_pretrained (LM + tokenizer)")
    if not (lm_dir / "tokenizer.json").is_file():
        raise UsageError(f"{lm_dir} has no tokenizer.json: save a fast tokenizer beside the LM "
                         "(tokenizer.save_pretrained(dir))")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(lm_dir, local_files_only=True)
    try:
        lm = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True, dtype="float32").eval()
    except ValueError as e:
        raise UsageError(f"{lm_dir}: {type(config).__name__} is not a causal LM ({str(e)[:120]}); pass a "
                         "Llama/Qwen2-family causal LM directory") from None
    return lm, AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)


def export_artifact(lm_dir: Path, out: Path, precision: str = "fp32", max_seq_len: int = 64,
                    sampling: Sampling = Sampling(), prompt_template: str = "{prompt}",
                    parity_tokens: int = 8, force: bool = False) -> dict[str, Any]:
    """LM directory -> artifact dir at `out` (kind lm); returns the manifest."""
    _check_out(out, force, prompt_template)
    lm, tok = load_lm(lm_dir)
    extra = [Path(lm_dir) / n for n in TOKENIZER_FILES if (Path(lm_dir) / n).is_file()]
    return _export(lm, None, tok, out, precision, max_seq_len, sampling, prompt_template, parity_tokens,
                   lambda tmp: [shutil.copyfile(f, tmp / f.name) for f in extra], {"lm_dir": Path(lm_dir).name})


def export_vlm_artifact(model: Any, card: Any, out: Path, precision: str = "fp32", max_seq_len: int = 64,
                        sampling: Sampling = Sampling(max_new_tokens=4),
                        prompt_template: str = "question: {prompt} answer:", parity_tokens: int = 8,
                        force: bool = False) -> dict[str, Any]:
    """An ADEM-VL model (effai.zoo.ademvl contract: encode_image, set_visual, lm) -> artifact dir (kind vlm):
    vision.pte (trunk + multiscale pool + projector, fp32 XNNPACK) and the fused decoder, which takes the visual
    features (1, Nv, D) as its third input on every step."""
    import torch

    _check_out(out, force, prompt_template)
    if getattr(model, "mode", "adem") != "adem":
        raise UsageError("only ADEM-VL's fused mode exports as a decoder; the prefix baseline is not exported")
    c, h, w = model.input_size
    pixels = torch.zeros(1, c, h, w)

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: Any) -> Any:
            return self.m.project(self.m.trunk(x)[-1])

    vision = Vision().eval()
    with torch.no_grad():
        visual = vision(pixels)
    image = {"size": [c, h, w], "mean": list(card.mean), "std": list(card.std), "scale": "pixels / 255",
             "mode": "L" if c == 1 else "RGB", "visual_shape": list(visual.shape)}

    def extras(tmp: Path) -> None:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        with torch.no_grad():
            ep = torch.export.export(vision, (pixels,))
            prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
        files.atomic_write(tmp / "vision.pte", prog.buffer)
        from effai.generate.decoders import load_forward

        got = load_forward(tmp / "vision.pte").execute([pixels])[0]
        image["parity_max_abs"] = float((got - visual).abs().max())
        model.tokenizer.save_pretrained(str(tmp))
        for junk in ("chat_template.jinja",):
            (tmp / junk).unlink(missing_ok=True)

    return _export(model.lm, visual, model.tokenizer, out, precision, max_seq_len, sampling, prompt_template,
                   parity_tokens, extras, {"model": card.name}, set_visual=model.set_visual, image=image)


# --- what can be exported as a generation artifact, decided before anything is loaded ----------------------------
DEFAULT_MAX_SEQ_LEN = 64
DEFAULT_MAX_NEW_TOKENS = 32
VLM_TEMPLATE = "question: {prompt} answer:"


def source_kind(source: str) -> str | None:
    """"lm" for an LM directory (config.json), "vlm" for an ADEM-VL run dir (model.safetensors with effai.ademvl
    metadata) or a visual-question-answering zoo card; None for anything else (a classifier, a timm name, a typo).
    Reads no weights."""
    p = Path(source)
    if (p / "config.json").is_file():
        return "lm"
    if _run_arch(p) is not None:
        return "vlm"
    from effai.zoo.catalog import CARDS

    return "vlm" if source in CARDS and CARDS.get(source).task == "visual-question-answering" else None


def source_name(source: str) -> str:
    """The name an export of `source` is filed under: the zoo name, else the directory's name."""
    return Path(source).name if Path(source).is_dir() else source


def vision_encoder(source: str) -> str | None:
    """The zoo name of a VLM's frozen vision trunk (it exports to every target as a classifier), None if unknown."""
    from effai.zoo.catalog import CARDS

    arch = _run_arch(Path(source)) or (CARDS.get(source).extra.get("arch_kwargs", {}) if source in CARDS else {})
    enc = arch.get("encoder")
    return enc if isinstance(enc, str) and enc in CARDS else None


def _run_arch(p: Path) -> dict[str, Any] | None:
    f = p / "model.safetensors"
    if not f.is_file():
        return None
    from safetensors import safe_open

    from effai.zoo.ademvl import META_KEY

    try:
        with safe_open(str(f), framework="pt") as fh:
            arch = json.loads((fh.metadata() or {}).get(META_KEY, "null"))
    except Exception:  # noqa: BLE001 - unreadable or not ours: not an ADEM-VL run (zoo.ademvl.load says why)
        return None
    return arch if isinstance(arch, dict) else None


def export_source(source: str, out: Path, precision: str = "fp32", max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, prompt_template: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """An LM directory, an ADEM-VL run directory or a generative zoo name -> artifact dir at `out`; the usage errors
    (precision, --out, template, what `source` is) come before the model is loaded. `prompt_template` None: "{prompt}"
    for an LM, VLM_TEMPLATE for ADEM-VL. What `effai generate-export` and `effai export --target executorch` run."""
    from effai.export.kv_decoder import PRECISIONS

    if precision not in PRECISIONS:
        raise UsageError(f"--quantize {precision!r} is not offered for decoders; choose from: {', '.join(PRECISIONS)}")
    if max_seq_len < 2:
        raise UsageError(f"--max-seq-len {max_seq_len} must be >= 2 (prompt + at least one answer token)")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    kind = source_kind(source)
    template = prompt_template or ("{prompt}" if kind == "lm" else VLM_TEMPLATE)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    if kind == "lm":
        return export_artifact(Path(source), out, precision, max_seq_len, sampling, template, force=force)
    p = Path(source)
    if kind is None:
        if not p.exists() and ("/" in source or source.startswith(".")):
            raise UsageError(f"{source} not found; pass an LM directory (save_pretrained + tokenizer.json), an ADEM-VL "
                             "run directory or a zoo name such as ademvl_tiny.digits")
        if p.exists():
            raise UsageError(f"{source} is neither an LM directory (config.json) nor an ADEM-VL run "
                             "(model.safetensors with effai.ademvl metadata)")
        from effai.zoo import resolve_card

        card = resolve_card(source)          # an unknown name: the zoo's own error, with suggestions
        raise UsageError(f"{source} is not a generative model (task {card.task}); pass an LM directory or an "
                         "ADEM-VL zoo name/run (effai zoo list shows each card's task)")
    _check_out(out, force, template)         # before the model is loaded
    model, card = load_vlm(source)
    return export_vlm_artifact(model, card, out, precision, max_seq_len, sampling, template, force=force)


def load_vlm(source: str) -> tuple[Any, Any]:
    """(ADEM-VL model, its card or the preprocessing a run's images get) from a zoo name or a run directory."""
    p = Path(source)
    if p.is_dir():
        from types import SimpleNamespace

        from effai.zoo.ademvl import load

        model = load(p)
        c = model.input_size[0]          # ADEM-VL normalizes with mean 0.5, std 0.5 per channel
        return model, SimpleNamespace(name=f"ademvl-run:{p.name}", mean=(0.5,) * c, std=(0.5,) * c)
    from effai import zoo

    loaded = zoo.create(source)
    if not hasattr(loaded.model, "set_visual"):
        raise UsageError(f"{source} is not a generative model (no ADEM-VL contract); pass an LM directory or an "
                         "ADEM-VL zoo name/run")
    return loaded.model, loaded.card


def _check_out(out: Path, force: bool, prompt_template: str) -> None:
    if Path(out).exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it or choose another --out")
    if "{prompt}" not in prompt_template:
        raise UsageError("--prompt-template must contain {prompt}")


def _export(lm: Any, visual: Any, tok: Any, out: Path, precision: str, max_seq_len: int, sampling: Sampling,
            prompt_template: str, parity_tokens: int, extras: Any, source: dict[str, Any],
            set_visual: Any = None, image: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parity: greedy tokens of the .pte in the ExecuTorch runtime against the same static-cache module in torch at
    fp32 (the fp32 LM for quantized decoders); fp32 must match exactly."""
    from effai.export import kv_decoder
    from effai.generate.decoders import ExecuTorchDecoder, TorchDecoder
    from effai.generate.loop import generate
    from effai.toolchain import versions

    out = Path(out)
    module = kv_decoder.static_cache_module(lm, max_seq_len, set_visual)
    exported, example = kv_decoder.export_decoder(module, max_seq_len,
                                                  None if visual is None else tuple(visual.shape))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out.parent} ({e.strerror}); choose a writable --out") from None
    tmp = files.staging_dir(out)
    try:
        record = kv_decoder.lower_decoder(exported, example, precision, tmp / "decoder.pte")
        extras(tmp)
        eos = tok.eos_token_id
        prompt = tok.encode(prompt_template.format(prompt=PARITY_PROMPT))
        greedy = Sampling(max_new_tokens=parity_tokens)
        ref = generate(TorchDecoder(module), prompt, greedy, max_seq_len, None, visual).tokens
        got = generate(ExecuTorchDecoder(tmp / "decoder.pte"), prompt, greedy, max_seq_len, None, visual).tokens
        same = sum(a == b for a, b in zip(ref, got))
        parity = {"prompt": PARITY_PROMPT, "torch_tokens": ref, "runtime_tokens": got,
                  "token_agreement": round(same / len(ref), 4), "identical": ref == got,
                  "reference": "torch static-cache module, fp32, greedy"}
        if precision == "fp32" and ref != got:
            raise EffaiError(f"fp32 decoder parity failed: torch greedy {ref} vs ExecuTorch {got}; see docs/generate.md")
        inputs = ["tokens (1,T) int64", "input_pos (T,) int64"] + ([] if visual is None else
                                                                   [f"visual {tuple(visual.shape)} float32"])
        manifest = {"schema": SCHEMA, "kind": "lm" if visual is None else "vlm",
                    "programs": {"decoder": "decoder.pte", "vision": None if visual is None else "vision.pte"},
                    "precision": precision, "max_seq_len": max_seq_len, "vocab_size": int(lm.config.vocab_size),
                    "eos_token_id": eos, "tokenizer": "tokenizer.json", "image": image,
                    "generation": {**sampling.to_dict(), "prompt_template": prompt_template},
                    "decoder": {"inputs": inputs, "outputs": ["logits (1,T,V) float32"],
                                "dynamic_T": [1, max_seq_len - 1], **record},
                    "source": {"lm_class": type(lm).__name__, **source},
                    "parity": parity, "toolchain": versions()}
        manifest["files"] = files.file_entries(tmp, (MANIFEST,))
        files.atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        files.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    def visual(self, image: Path) -> Any:
        """The image file -> visual features (1, Nv, D) by vision.pte in the ExecuTorch runtime."""
        import numpy as np
        import torch
        from PIL import Image

        from effai.data.datasets import read_image

        spec = self.manifest.get("image") or {}
        c, h, w = spec["size"]
        arr = read_image(Path(image), spec.get("mode", "RGB"), "--image")
        arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        arr = arr.reshape(h, w, c).transpose(2, 0, 1)
        arr = (arr - np.array(spec["mean"], np.float32)[:, None, None]) / np.array(spec["std"], np.float32)[:, None, None]
        return self.vision()(torch.from_numpy(np.ascontiguousarray(arr[None])))

    def vision(self) -> Any:
        """vision.pte's forward as a function: normalized pixels (1, C, H, W) -> visual features (1, Nv, D)."""
        from effai.generate.decoders import load_forward

        method = load_forward(self.path / self.manifest["programs"]["vision"])
        return lambda pixels: method.execute([pixels])[0]

    def decoder(self) -> Any:
        from effai.generate.decoders import ExecuTorchDecoder

        return ExecuTorchDecoder(self.path / self.manifest["programs"]["decoder"])


def is_artifact(path: Path) -> bool:
    """Does `path` look like a generation artifact (its manifest names this schema)? read() checks it in full."""
    return files.names_schema(Path(path) / MANIFEST, SCHEMA)


def read(path: Path) -> Artifact:
    """The artifact at `path`, its manifest checked (schema, kind, files and hashes); usage errors otherwise."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UsageError(f"{path} is not an artifact dir (no {MANIFEST}); make one with effai generate-export")
    m = files.read_json(path / MANIFEST)
    if not isinstance(m, dict):
        raise UsageError(f"{path / MANIFEST} is not a JSON object; re-export the artifact")
    if m.get("schema") == "effai.manifest/1":
        raise UsageError(f"{path} is a single-forward model artifact (target {m.get('target')}), not a generation "
                         f"one; use effai predict, or export an LM with effai generate-export")
    if m.get("schema") != SCHEMA:
        raise UsageError(f"{path}: unknown artifact schema {str(m.get('schema'))[:40]!r}; this effai reads {SCHEMA}")
    if m.get("kind") not in KINDS:
        raise UsageError(f"{path}: unknown artifact kind {str(m.get('kind'))[:40]!r}; choose from: {', '.join(KINDS)}")
    entries = m.get("files")
    if not isinstance(entries, list):
        raise UsageError(f"{path / MANIFEST} lists no files; re-export the artifact")
    problems = files.check_entries(path, entries, MANIFEST, (MANIFEST,))
    if problems:
        raise UsageError(f"{path}: {problems[0]}{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                         "re-export the artifact")
    if files.inside(path, (m.get("programs") or {}).get("decoder")) is None:
        raise UsageError(f"{path}: the manifest's decoder program is not a file inside the artifact; re-export it")
    return Artifact(path, m)
