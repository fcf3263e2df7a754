"""ADEM-VL (Hao et al. 2024, arXiv:2410.17779): frozen HF causal LM + frozen vision trunk, trainable projector,
parameter-free cross-attention added to every LM layer's MLP output, multiscale pooled visual features, adaptive
fusion; and the LLaVA-style prefix baseline. Registered as architecture `ademvl`. Method and formulas: docs/ademvl.md.
CONTRACT (generation/export): `v = model.encode_image(pixels)` -> (B, Nv, D); `model.set_visual(v | None)` stores it
for the fusion; `model.lm` is the HF causal LM with the fusion inside, so `model.set_visual(v); model.lm(input_ids=...,
past_key_values=...)` runs fused (prefix mode: `model.prefix_embeds(v, input_ids)` gives the inputs_embeds instead).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import UsageError
from effai.zoo.archs import ARCHS
from effai.zoo.build import build, resolve_card
from effai.zoo.cdfkd_student import StageTrunk

MODES = ("adem", "prefix")
CAUSAL_LM_TYPES = ("llama", "qwen2")       # model_type of the LM classes the fusion is written for
WEIGHTS_DIR = Path(__file__).parent / "weights"
META_KEY = "effai.ademvl"                  # the safetensors metadata a trained ADEM-VL checkpoint carries


class VisualSlot(nn.Module):
    """Holds the projected visual features for the next LM forward, and the fusion's only parameters: the two
    learned per-visual-token offsets of the reference code (e1 for the keys, e2 for the values; e2 starts at zero,
    so a fresh model leaves the LM unchanged)."""

    def __init__(self, num_visual: int, dim: int, drop_ratio: float, scale: float) -> None:
        super().__init__()
        self.emb_k = nn.Parameter(torch.randn(1, num_visual, dim) * 0.02)
        self.emb_v = nn.Parameter(torch.zeros(1, num_visual, dim))
        self.drop_ratio, self.scale = float(drop_ratio), float(scale)
        self.visual: torch.Tensor | None = None


def parameter_free_cross_attention(h: torch.Tensor, visual: torch.Tensor, emb_k: torch.Tensor, emb_v: torch.Tensor,
                                   drop_ratio: float) -> torch.Tensor:
    """ADEM-VL's fusion, no q/k/v projections:  A = SiLU(h) SiLU(V + e1)^T  (B, T, Nv);  adaptive fusion zeroes,
    per text token, the floor(drop_ratio * Nv) visual features with the lowest scores (the reference's sort and
    threshold); out = A (V + e2)  (B, T, D)."""
    return fusion_scores(h, visual, emb_k, drop_ratio) @ (visual + emb_v)


def fusion_scores(h: torch.Tensor, visual: torch.Tensor, emb_k: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """A = SiLU(h) SiLU(V + e1)^T with each row's floor(drop_ratio * Nv) lowest scores set to 0 (kept: scores at or
    above the (n_drop+1)-th smallest, as the reference's threshold; export-friendly: sort + compare, no scatter)."""
    scores = F.silu(h) @ F.silu(visual + emb_k).transpose(1, 2)
    n_drop = int(drop_ratio * scores.shape[-1])
    if n_drop > 0:
        threshold = scores.sort(dim=-1).values[..., n_drop:n_drop + 1]
        scores = scores * (scores >= threshold).to(scores.dtype)
    return scores


class FusedMLP(nn.Module):
    """An LM layer's MLP plus the parallel fusion branch on the same (post-attention-norm) input, as the reference
    adds its adapter next to the feed-forward: out = MLP(x) + s * CrossAttn(x, V)."""

    def __init__(self, mlp: nn.Module, slot: VisualSlot) -> None:
        super().__init__()
        self.mlp = mlp
        object.__setattr__(self, "_slot", slot)       # shared, registered once (on the LM as `ademvl_fusion`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        slot = self._slot
        if slot.visual is None:
            return out
        v = slot.visual.to(x.dtype)
        return out + slot.scale * parameter_free_cross_attention(x, v, slot.emb_k.to(x.dtype),
                                                                 slot.emb_v.to(x.dtype), slot.drop_ratio)


class MultiscalePool(nn.Module):
    """One feature map (B, C, h, w) -> tokens pooled to each s x s grid, concatenated: (B, sum s^2, C)."""

    def __init__(self, scales: Sequence[int]) -> None:
        super().__init__()
        self.scales = tuple(int(s) for s in scales)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        out = []
        for s in self.scales:
            p = fmap if fmap.shape[-1] == s and fmap.shape[-2] == s else F.adaptive_avg_pool2d(fmap, s)
            out.append(p.flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class Projector(nn.Module):
    """fc2(SiLU(fc1(x))): visual width -> LM width (the reference's projector)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class AdemVL(nn.Module):
    """Vision trunk (frozen) -> multiscale pooling -> projector (trainable) -> the LM (frozen) fused by ADEM-VL's
    parameter-free cross-attention (mode 'adem') or fed the visual tokens in front of the text (mode 'prefix')."""

    def __init__(self, trunk: nn.Module, lm: nn.Module, tokenizer: Any, *, feature_dim: int, scales: Sequence[int],
                 mode: str = "adem", drop_ratio: float = 0.1, beta: float = 1.0, scale: float = 1.0,
                 proj_hidden: int = 128, input_size: Sequence[int] = (1, 64, 64), arch: dict | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise UsageError(f"unknown ADEM-VL mode '{mode}'; choose one of: {', '.join(MODES)}")
        if not 0.0 <= drop_ratio < 1.0:
            raise UsageError(f"drop_ratio {drop_ratio} must lie in [0, 1)")
        self.mode, self.beta, self.input_size = mode, float(beta), tuple(int(v) for v in input_size)
        self.trunk = trunk.eval().requires_grad_(False)
        self.pool = MultiscalePool(scales)
        self.num_visual = sum(s * s for s in self.pool.scales)
        dim = int(lm.config.hidden_size)
        self.projector = Projector(feature_dim, proj_hidden, dim)
        self.lm = lm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.arch = dict(arch or {})
        if mode == "adem":
            slot = VisualSlot(self.num_visual, dim, drop_ratio, scale)
            self.lm.add_module("ademvl_fusion", slot)
            for layer in _decoder_layers(self.lm):
                layer.mlp = FusedMLP(layer.mlp, slot)
        from effai.data.vqa import Q_DIGIT, prompt

        ids = tokenizer(prompt(Q_DIGIT))["input_ids"]
        self.register_buffer("default_prompt", torch.tensor([ids], dtype=torch.long), persistent=False)

    # --- the contract ------------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels (B, C, H, W) at the trunk's input size -> projected visual features (B, Nv, D)."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.input_size:
            raise UsageError(f"image tensor {tuple(pixels.shape)} does not match the vision encoder's input "
                             f"(B, {', '.join(map(str, self.input_size))}); resize to {self.input_size[1]}x"
                             f"{self.input_size[2]} with {self.input_size[0]} channel(s)")
        with torch.no_grad():
            fmap = self.trunk(pixels)[-1]
        return self.project(fmap)

    def project(self, fmap: torch.Tensor) -> torch.Tensor:
        """The trainable path from a (cached) trunk feature map to the visual features."""
        return self.beta * self.projector(self.pool(fmap))

    def set_visual(self, visual: torch.Tensor | None) -> None:
        """Store the visual features (B, Nv, D) the fusion reads in the following LM forwards (None: text only)."""
        if self.mode == "adem":
            self.lm.ademvl_fusion.visual = visual
        else:
            self._prefix_visual = visual

    def prefix_embeds(self, visual: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefix baseline: [visual tokens ; token embeddings of input_ids] as inputs_embeds (LLaVA)."""
        emb = self.lm.get_input_embeddings()(input_ids)
        return torch.cat([visual.to(emb.dtype), emb], dim=1)

    # --- whole forward: next-token logits for a prompt about the image ----------------------------------------------
    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (default: 'which digit is this?') about the image; in prefix mode the
        visual positions are cut off, so both modes return the text positions."""
        visual = self.encode_image(pixels)
        ids = self.default_prompt.expand(pixels.shape[0], -1) if input_ids is None else input_ids
        return self.text_logits(visual, ids, attention_mask)

    def text_logits(self, visual: torch.Tensor, ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "adem":
            self.set_visual(visual)
            try:
                return self.lm(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
            finally:
                self.set_visual(None)
        if attention_mask is not None:
            ones = torch.ones(ids.shape[0], visual.shape[1], dtype=attention_mask.dtype, device=ids.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        out = self.lm(inputs_embeds=self.prefix_embeds(visual, ids), attention_mask=attention_mask, use_cache=False)
        return out.logits[:, visual.shape[1]:]

    def train(self, mode: bool = True) -> AdemVL:
        super().train(mode)
        self.trunk.eval()                                   # frozen parts keep eval behaviour (BatchNorm, dropout)
        self.lm.eval()
        return self

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, question: str, max_new_tokens: int = 4) -> list[str]:
        """Greedy answers (one per image) to one question, with the LM's KV cache."""
        from effai.data.vqa import prompt

        visual = self.encode_image(pixels)
        ids = torch.tensor([self.tokenizer(prompt(question))["input_ids"]], device=pixels.device)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip()
                for t in greedy(self, visual, ids.expand(pixels.shape[0], -1), max_new_tokens)]


@torch.no_grad()
def greedy(model: AdemVL, visual: torch.Tensor, ids: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding with HF's KV cache for a batch of equal-length prompts; tokens up to <eos> per row."""
    eos = model.tokenizer.eos_token_id
    out = torch.empty(ids.shape[0], 0, dtype=torch.long, device=ids.device)
    if model.mode == "adem":
        model.set_visual(visual)
        first = model.lm(input_ids=ids, use_cache=True)
    else:
        first = model.lm(inputs_embeds=model.prefix_embeds(visual, ids), use_cache=True)
    try:
        past, logits = _cache_of(first), first.logits[:, -1]
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if bool((out == eos).any(1).all()):
                break
            step = model.lm(input_ids=nxt, cache=past, use_cache=True)
            past, logits = _cache_of(step), step.logits[:, -1]
    finally:
        model.set_visual(None)
    rows = []
    for r in out.tolist():
        rows.append(r[:r.index(eos)] if eos in r else r)
    return rows


def _cache_of(out: Any) -> Any:
    """The KV cache an HF forward returned (transformers 5 names it `cache`, earlier ones `past_key_values`)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise UsageError(f"{type(lm).__name__} has no model.layers[i].mlp; ADEM-VL's fusion is written for the "
                         f"{'/'.join(CAUSAL_LM_TYPES)} causal LM classes")
    return list(layers)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts of an ADEM-VL / prefix model: projector, fusion, total (and the frozen rest)."""
    named = dict(model.named_parameters())
    proj = sum(p.numel() for n, p in named.items() if n.startswith("projector.") and p.requires_grad)
    fusion = sum(p.numel() for n, p in named.items() if "ademvl_fusion." in n and p.requires_grad)
    total = sum(p.numel() for p in named.values() if p.requires_grad)
    return {"projector": proj, "fusion": fusion, "trainable": total,
            "frozen": sum(p.numel() for p in named.values() if not p.requires_grad)}


# --- loading: a local HF causal LM, a vision trunk, the whole model -------------------------------------------------

def resolve_lm_dir(spec: str) -> Path:
    """'bundled:<dir>' (inside effai/zoo/weights) or a local directory. Hub ids are refused at once (no network)."""
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise UsageError(f"bad bundled LM name {name!r}")
        return WEIGHTS_DIR / name
    p = Path(spec)
    if not p.exists():
        hub = "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1
        raise UsageError(f"LM directory {spec} does not exist" + (
            " (it looks like a Hugging Face hub id: effai does not download at run time; fetch it where there is "
            "network, e.g. `huggingface-cli download " + spec + " --local-dir DIR`, and pass the local DIR)"
            if hub else "; pass a local folder holding config.json, model.safetensors and the tokenizer"))
    return p


def load_causal_lm(path: str | Path) -> nn.Module:
    """A Llama- or Qwen2-family `transformers` causal LM from a local directory (safetensors weights only, no remote
    code, no network); one-line UsageErrors for missing files and other model classes."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} has no config.json; pass a folder saved with model.save_pretrained() (an HF causal LM "
                         "such as SmolLM2 / Qwen2.5 / Llama)")
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8", errors="replace")[: 1 << 20])
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}/config.json is not valid JSON ({e.msg}); re-save the LM") from None
    mtype = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mtype not in CAUSAL_LM_TYPES:
        raise UsageError(f"{p} holds a '{mtype}' model; ADEM-VL takes a causal LM of type "
                         f"{', '.join(CAUSAL_LM_TYPES)} (LlamaForCausalLM, Qwen2ForCausalLM)")
    if not any(p.glob("*.safetensors")):
        raise UsageError(f"{p} has no *.safetensors weights (effai never unpickles .bin files); re-save it with "
                         "save_pretrained(safe_serialization=True)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, use_safetensors=True,
                                                  trust_remote_code=False, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a damaged directory
        raise UsageError(f"cannot load the causal LM in {p}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}; re-save it with save_pretrained()") from None
    if not type(lm).__name__.endswith("ForCausalLM"):
        raise UsageError(f"{p} loads as {type(lm).__name__}, not a causal LM; pass an *ForCausalLM checkpoint")
    return lm.eval()


def build_trunk(encoder: str, feature_layer: str) -> tuple[nn.Module, int, tuple[int, int, int], tuple, tuple]:
    """The frozen vision trunk up to `feature_layer` of a zoo / timm model (its own bundled weights when the zoo
    ships them); returns (trunk, channels at the layer, input size, mean, std)."""
    from effai.zoo.weights import load_into, read_state_dict

    if encoder.startswith("timm-hub:") or encoder.endswith(":pretrained"):
        raise UsageError("pretrained hub encoders are not fetched at run time (no network); pass a zoo name with "
                         "bundled weights (ghostnetv3_050.digits) or a local checkpoint via the zoo")
    card = resolve_card(encoder)
    model = build(card)
    if card.bundled_weights:
        f = WEIGHTS_DIR / card.bundled_weights
        load_into(model, read_state_dict(f), card.name, f)
    trunk = StageTrunk(model, [feature_layer]).eval()
    with torch.no_grad():
        fmap = trunk(torch.zeros(1, *card.input_size))[-1]
    if fmap.ndim != 4:
        raise UsageError(f"{encoder}.{feature_layer} gives a {tuple(fmap.shape)} output, not a (B, C, h, w) feature "
                         "map; choose a convolutional stage")
    return trunk, int(fmap.shape[1]), tuple(card.input_size), tuple(card.mean), tuple(card.std)  # type: ignore[return-value]


ARCH_DEFAULTS: dict[str, Any] = {"lm": "bundled:ademvl_tiny_digits_lm", "encoder": "ghostnetv3_050.digits",
                                 "feature_layer": "blocks.6", "scales": [4, 2, 1], "mode": "adem",
                                 "drop_ratio": 0.1, "beta": 1.0, "scale": 1.0, "proj_hidden": 128}


def build_ademvl(lm: str | None = None, *, lm_root: Path | None = None, **kw: Any) -> AdemVL:
    """The model from its architecture options (ARCH_DEFAULTS names them); `lm` is resolved against `lm_root` when
    relative (a run's own `lm/` folder)."""
    from effai.data.vqa import load_tokenizer

    unknown = sorted(set(kw) - set(ARCH_DEFAULTS) - {"num_classes", "in_chans"})
    if unknown:
        raise UsageError(f"unknown ADEM-VL options {unknown}; valid: {', '.join(sorted(ARCH_DEFAULTS))}")
    opts = {**ARCH_DEFAULTS, **{k: v for k, v in kw.items() if k in ARCH_DEFAULTS}, "lm": lm or ARCH_DEFAULTS["lm"]}
    lm_spec = str(opts["lm"])
    lm_dir = (lm_root / lm_spec) if lm_root is not None and not lm_spec.startswith("bundled:") \
        and not Path(lm_spec).is_absolute() else resolve_lm_dir(lm_spec)
    tok = load_tokenizer(lm_dir)
    model = load_causal_lm(lm_dir)
    trunk, channels, size, _, _ = build_trunk(str(opts["encoder"]), str(opts["feature_layer"]))
    return AdemVL(trunk, model, tok, feature_dim=channels, scales=opts["scales"], mode=str(opts["mode"]),
                  drop_ratio=float(opts["drop_ratio"]), beta=float(opts["beta"]), scale=float(opts["scale"]),
                  proj_hidden=int(opts["proj_hidden"]), input_size=size, arch=opts)


def arch_factory(**kwargs: Any) -> nn.Module:
    """ARCHS' `ademvl`: zoo cards build the model from their arch_kwargs."""
    kwargs.pop("num_classes", None)
    kwargs.pop("in_chans", None)
    return build_ademvl(**kwargs)


ARCHS.register("ademvl", arch_factory)


def load(path: str | Path) -> AdemVL:
    """A trained ADEM-VL checkpoint (a run dir or its model.safetensors): the architecture from the file's
    `effai.ademvl` metadata (checked: known keys, bounded values), its LM folder beside it, the weights loaded
    strictly."""
    from safetensors import safe_open

    from effai.files import loads_json
    from effai.zoo.weights import load_into, read_state_dict

    p = Path(path)
    f = p / "model.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise UsageError(f"{path}: no model.safetensors; pass an ADEM-VL run directory (effai train ademvl --out)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors' own error type for damaged headers
        raise UsageError(f"{f} is not a readable safetensors file: {str(e).splitlines()[0][:120]}") from None
    if META_KEY not in meta:
        raise UsageError(f"{f} carries no {META_KEY} metadata: it is not an ADEM-VL checkpoint from effai")
    arch = loads_json(meta[META_KEY], f"the {META_KEY} metadata of {f}")
    if not isinstance(arch, dict) or set(arch) - set(ARCH_DEFAULTS):
        raise UsageError(f"{f}: malformed {META_KEY} metadata; re-train or re-save it")
    lm = str(arch.get("lm", ""))
    if not lm or len(lm) > 1000 or (not Path(lm).is_absolute() and ".." in Path(lm).parts):
        raise UsageError(f"{f}: its LM folder {lm[:60]!r} must be a folder beside the checkpoint or an absolute "
                         "path; re-save it")
    scales = arch.get("scales", [])
    if not isinstance(scales, list) or not 1 <= len(scales) <= 8 or not all(
            isinstance(s, int) and 1 <= s <= 64 for s in scales):
        raise UsageError(f"{f}: scales {str(scales)[:40]} out of range (1..64, at most 8); re-save it")
    model = build_ademvl(lm_root=f.parent, **arch)
    load_into(model, read_state_dict(f), "ademvl", f)
    return model.eval()


def save(model: AdemVL, path: Path, record: dict[str, Any]) -> Path:
    """model.safetensors (whole state, atomic) with the architecture in `effai.ademvl` and the run in `effai.train`."""
    import os

    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = {META_KEY: json.dumps(model.arch), "effai.train": json.dumps(record)}
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():       # tied weights (embeddings = LM head) are stored once per name
        v = v.detach().cpu().contiguous()
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    try:
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def prefill_flops(mode: str, layers: int, dim: int, ffn: int, text: int, visual: int) -> float:
    """Multiply-adds of one prefill (batch 1), for the docs' cost model: per layer, attention projections + scores
    and the MLP over the sequence; 'prefix' runs T+Nv positions, 'adem' T positions plus 2*T*Nv*D for the fusion."""
    n = text + visual if mode == "prefix" else text
    per_layer = 4 * n * dim * dim + 2 * n * n * dim + 3 * n * dim * ffn
    if mode == "adem":
        per_layer += 2 * text * visual * dim
    return float(layers * per_layer)
