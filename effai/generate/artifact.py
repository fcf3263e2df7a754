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
    """LM directory -> artifact dir at `out`; returns the manifest. Parity: greedy tokens of the .pte in the
    ExecuTorch runtime against the same static-cache module in torch at fp32 (the fp32 LM for quantized decoders)."""
    from effai.export import kv_decoder
    from effai.generate.decoders import ExecuTorchDecoder, TorchDecoder
    from effai.generate.loop import generate
    from effai.toolchain import versions

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it or choose another --out")
    if "{prompt}" not in prompt_template:
        raise UsageError("--prompt-template must contain {prompt}")
    lm, tok = load_lm(lm_dir)
    module = kv_decoder.static_cache_module(lm, max_seq_len)
    exported, example = kv_decoder.export_decoder(module, max_seq_len)
    tmp = files.staging_dir(out)
    try:
        record = kv_decoder.lower_decoder(exported, example, precision, tmp / "decoder.pte")
        for name in TOKENIZER_FILES:
            if (Path(lm_dir) / name).is_file():
                shutil.copyfile(Path(lm_dir) / name, tmp / name)
        eos = tok.eos_token_id
        prompt = tok.encode(prompt_template.format(prompt=PARITY_PROMPT))
        greedy = Sampling(max_new_tokens=parity_tokens)
        ref = generate(TorchDecoder(module), prompt, greedy, max_seq_len, None).tokens
        got = generate(ExecuTorchDecoder(tmp / "decoder.pte"), prompt, greedy, max_seq_len, None).tokens
        same = sum(a == b for a, b in zip(ref, got))
        parity = {"prompt": PARITY_PROMPT, "torch_tokens": ref, "runtime_tokens": got,
                  "token_agreement": round(same / len(ref), 4), "identical": ref == got,
                  "reference": "torch static-cache module, fp32, greedy"}
        if precision == "fp32" and ref != got:
            raise EffaiError(f"fp32 decoder parity failed: torch greedy {ref} vs ExecuTorch {got}; see docs/generate.md")
        manifest = {"schema": SCHEMA, "kind": "lm", "programs": {"decoder": "decoder.pte", "vision": None},
                    "precision": precision, "max_seq_len": max_seq_len, "vocab_size": int(lm.config.vocab_size),
                    "eos_token_id": eos, "tokenizer": "tokenizer.json",
                    "generation": {**sampling.to_dict(), "prompt_template": prompt_template},
                    "decoder": {"inputs": ["tokens (1,T) int64", "input_pos (T,) int64"],
                                "outputs": ["logits (1,T,V) float32"], "dynamic_T": [1, max_seq_len - 1], **record},
                    "source": {"lm_class": type(lm).__name__, "lm_dir": str(Path(lm_dir).name)},
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

    def decoder(self) -> Any:
        from effai.generate.decoders import ExecuTorchDecoder

        return ExecuTorchDecoder(self.path / self.manifest["programs"]["decoder"])


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
