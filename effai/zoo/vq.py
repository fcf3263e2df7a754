"""A tiny VQ-VAE image tokenizer (van den Oord et al. 2017, "Neural Discrete Representation Learning",
arXiv:1711.00937), the visual tokenizer of DeLVM (Guo et al. 2024, "Data-efficient Large Vision Models through
Sequential Autoregression", arXiv:2402.04841; reference code github ggjy/DeLVM uses a VQGAN, this is its small
CPU-sized stand-in).

    z_e = E(x)                       (B, D, h, w), h = H / 4
    k   = argmin_j || z_e - e_j ||^2 (per position; e_j: the K codebook vectors)
    z_q = z_e + sg(e_k - z_e)        (straight-through estimator: the decoder's gradient flows to the encoder)
    x^  = G(z_q)
    L   = || x - x^ ||^2 + beta || z_e - sg(e_k) ||^2     (beta = 0.25, the commitment loss)

The codebook is not trained by a loss but by exponential moving averages (the paper's appendix, decay gamma):
    N_j <- gamma N_j + (1 - gamma) n_j,   m_j <- gamma m_j + (1 - gamma) sum_{i: k_i = j} z_e,i,   e_j = m_j / N_j
(Laplace-smoothed N), and codes unused for a while restart at random encoder outputs (dead-code restart).

Export contract: `encoder` (pixels in [-1, 1] -> z_e) and `decoder` (z_q -> pixels in [-1, 1]) are plain conv nets
that every effai target lowers; the nearest-code lookup runs beside them (numpy or torch) with `codebook`.
Spec and measured numbers: docs/delvm.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effai.data.visual_sentences import BOS, N_SPECIAL, SEP
from effai.errors import UsageError
from effai.zoo.ademvl import load_causal_lm, resolve_lm_dir
from effai.zoo.archs import ARCHS

META_KEY = "effai.vq"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class VQConfig:
    channels: int = 1          # image channels (1 greyscale, 3 RGB)
    size: int = 32             # square input side; tokens per image = (size / 4)^2
    hidden: int = 48           # conv width
    dim: int = 32              # code vector width D
    codebook: int = 256        # K
    beta: float = 0.25         # commitment weight
    decay: float = 0.99        # EMA decay gamma

    def __post_init__(self) -> None:
        if self.size % 4 or self.size < 8:
            raise UsageError(f"VQ size {self.size} must be a multiple of 4 and >= 8 (the encoder downsamples 4x)")
        if self.channels not in (1, 3):
            raise UsageError(f"VQ channels {self.channels}: choose 1 (greyscale) or 3 (RGB)")
        if self.codebook < 2 or self.dim < 1 or self.hidden < 1:
            raise UsageError("VQ codebook must be >= 2 and dim, hidden >= 1")
        if not 0 < self.decay < 1 or self.beta < 0:
            raise UsageError(f"VQ decay {self.decay} must lie in (0, 1) and beta {self.beta} be >= 0")

    @property
    def grid(self) -> int:
        return self.size // 4

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


class Encoder(nn.Sequential):
    def __init__(self, c: VQConfig) -> None:
        h = c.hidden
        super().__init__(nn.Conv2d(c.channels, h, 4, 2, 1), nn.ReLU(), nn.Conv2d(h, h, 4, 2, 1), nn.ReLU(),
                         nn.Conv2d(h, h, 3, 1, 1), nn.ReLU(), nn.Conv2d(h, c.dim, 1))


class Decoder(nn.Sequential):
    def __init__(self, c: VQConfig) -> None:
        h = c.hidden
        super().__init__(nn.Conv2d(c.dim, h, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(h, h, 4, 2, 1), nn.ReLU(),
                         nn.ConvTranspose2d(h, h, 4, 2, 1), nn.ReLU(), nn.Conv2d(h, c.channels, 3, 1, 1))


class VQVAE(nn.Module):
    """encoder -> EMA codebook (straight-through) -> decoder. Pixels in [-1, 1] (x / 127.5 - 1)."""

    def __init__(self, config: VQConfig = VQConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.register_buffer("codebook", torch.randn(config.codebook, config.dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(config.codebook))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("usage", torch.ones(config.codebook))
        self.register_buffer("initialized", torch.zeros(()))

    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest codebook index per position: (B, D, h, w) -> (B, h*w) int64, row-major."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)[None])
        return d.argmin(1).view(z_e.shape[0], -1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h*w) indices -> z_q (B, D, h, w)."""
        g = self.config.grid
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.codebook):
            raise UsageError(f"token ids must lie in 0..{self.config.codebook - 1} (the codebook size); the LM's "
                             "vocabulary does not match this tokenizer")
        return self.codebook[idx].view(idx.shape[0], g, g, -1).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.codes(self.encoder(x))

    @torch.no_grad()
    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.lookup(idx)).clamp(-1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, loss L, indices). In training mode the codebook takes one EMA step."""
        self._check(x)
        z_e = self.encoder(x)
        idx = self.codes(z_e)
        z_q = self.lookup(idx)
        if self.training:
            self._ema(z_e.detach(), idx)
        commit = F.mse_loss(z_e, z_q.detach())
        x_hat = self.decoder(z_e + (z_q - z_e).detach())
        return x_hat, F.mse_loss(x_hat, x) + self.config.beta * commit, idx

    @torch.no_grad()
    def _ema(self, z_e: torch.Tensor, idx: torch.Tensor) -> None:
        c = self.config
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, c.dim)
        if not bool(self.initialized):   # codebook starts at random encoder outputs (all codes in the data's range)
            self.codebook.copy_(flat[torch.randint(0, len(flat), (c.codebook,), device=flat.device)])
            self.ema_sum.copy_(self.codebook)
            self.initialized.fill_(1.0)
            idx = self.codes(z_e)
        onehot = F.one_hot(idx.reshape(-1), c.codebook).to(flat.dtype)
        n = onehot.sum(0)
        self.ema_count.mul_(c.decay).add_(n, alpha=1 - c.decay)
        self.ema_sum.mul_(c.decay).add_(onehot.t() @ flat, alpha=1 - c.decay)
        total = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (total + c.codebook * 1e-5) * total
        self.codebook.copy_(self.ema_sum / count[:, None])
        self.usage.mul_(0.95).add_(n, alpha=0.05)
        dead = (self.usage < 1e-2).nonzero().flatten()
        if len(dead):   # dead-code restart at random encoder outputs of this batch
            pick = flat[torch.randint(0, len(flat), (len(dead),), device=flat.device)]
            self.codebook[dead] = pick
            self.ema_sum[dead] = pick
            self.ema_count[dead] = 1.0
            self.usage[dead] = 1.0

    def _check(self, x: torch.Tensor) -> None:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.channels, c.size, c.size):
            raise UsageError(f"the VQ tokenizer takes images of {c.channels}x{c.size}x{c.size}, got "
                             f"{tuple(x.shape[1:])}; resize the image to {c.size}x{c.size}")


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the tokenizer's [-1, 1]."""
    return x * 2 - 1


def from_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: 10 log10(1 / MSE)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def save(model: VQVAE, path: Path, record: dict[str, Any] | None = None) -> Path:
    """Weights (safetensors) with the config (and an optional training record) in the file's metadata."""
    from safetensors.torch import save

    from effai.files import atomic_write

    meta = {META_KEY: json.dumps({"config": asdict(model.config), "record": record or {}})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), save(state, metadata=meta))
    return Path(path)


def load(path: Path) -> VQVAE:
    """A VQVAE from a file written by `save`; one-line errors for a missing or foreign file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist; train a tokenizer with effai train delvm")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:   # not a safetensors file
        raise UsageError(f"{path} is not a safetensors file ({str(e)[:80]}); pass a vq.safetensors from effai "
                         "train delvm") from None
    if META_KEY not in meta:
        raise UsageError(f"{path} carries no {META_KEY} metadata; pass a vq.safetensors written by effai train delvm")
    spec = json.loads(meta[META_KEY])
    model = VQVAE(VQConfig(**spec["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# --- the zoo's DeLVM model (card delvm_tiny, ARCHS "delvm") ----------------------------------------------------------

ARCH_DEFAULTS: dict[str, Any] = {"lm": "bundled:delvm_tiny_lm", "channels": 1, "size": 16, "hidden": 32, "dim": 32,
                                 "codebook": 64}


class DelvmModel(nn.Module):
    """DeLVM as one module: the VQ tokenizer (`vq`) and the visual-token causal LM (`lm`, a Llama-class
    `transformers` model over '<unk> <s> </s> <sep>' + K visual tokens; effai/data/visual_sentences.py).

    forward(x, example_in=None, example_out=None) -> the generated output image of query x, in context:
        prompt = <s> E(example_in) <sep> E(example_out) <sep> E(x) <sep>      (E: encoder + nearest code)
        k_t    = argmax_{k < K} p_LM(visual token k | prompt, k_<t),  t = 1 .. T (T = (size/4)^2, KV cache)
        y      = G(codebook[k_1..k_T])                                  (G: the VQ decoder), clamped to [-1, 1]
    Images (B, C, size, size) in [-1, 1] (the card's mean = std = 0.5 normalisation of [0, 1] pixels). Without an
    example pair the query is its own example (the identity task), so one image in costs what a generation costs
    (the zoo's params and MACs count it).

    The module's state dict is the tokenizer's (the card's bundled file, `vq.save` format without metadata); the LM's
    weights live in its own Hugging Face folder (`arch_kwargs["lm"]`), loaded when the model is built, as effai
    delvm export reads them. Deployment: `effai delvm export delvm_tiny` (docs/delvm.md)."""

    def __init__(self, vq: VQVAE, lm: nn.Module) -> None:
        super().__init__()
        vocab = int(lm.config.vocab_size)
        if vocab != N_SPECIAL + vq.config.codebook:
            raise UsageError(f"the LM's vocabulary ({vocab}) does not match the tokenizer's codebook "
                             f"({vq.config.codebook} + {N_SPECIAL} specials); pair the LM with its tokenizer")
        self.vq, self.lm = vq, lm

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:   # type: ignore[override]
        return self.vq.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:   # type: ignore[override]
        return self.vq.load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, example_in: torch.Tensor | None = None,
                example_out: torch.Tensor | None = None) -> torch.Tensor:
        if (example_in is None) != (example_out is None):
            raise UsageError("give both example_in and example_out (an example pair of the task), or neither")
        if example_in is None:
            example_in = example_out = x
        b = x.shape[0]
        codes = [self.vq.encode(t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t)
                 for t in (example_in, example_out, x)]
        sep = torch.full((b, 1), SEP, dtype=torch.long, device=x.device)
        prompt = torch.cat([torch.full((b, 1), BOS, dtype=torch.long, device=x.device),
                            codes[0] + N_SPECIAL, sep, codes[1] + N_SPECIAL, sep, codes[2] + N_SPECIAL, sep], 1)
        out = self.lm(input_ids=prompt, use_cache=True)
        key = "cache" if "cache" in out else "past_key_values"   # transformers >= 5.2x names it `cache`
        picked = []
        for i in range(self.vq.config.tokens):
            nxt = out.logits[:, -1, N_SPECIAL:].argmax(-1)
            picked.append(nxt)
            if i + 1 < self.vq.config.tokens:
                out = self.lm(input_ids=(nxt + N_SPECIAL)[:, None], use_cache=True, **{key: out[key]})
        return self.vq.decode(torch.stack(picked, 1))


def arch_factory(lm: str = ARCH_DEFAULTS["lm"], num_classes: int = 0, in_chans: int = 1, **kw: Any) -> DelvmModel:
    """ARCHS' `delvm`: the tokenizer (random init; the card's bundled file fills it) and the LM from its folder
    ('bundled:<dir>' inside effai/zoo/weights, or a local save_pretrained folder)."""
    unknown = sorted(set(kw) - set(ARCH_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown DeLVM options {unknown}; valid: {', '.join(sorted(ARCH_DEFAULTS))}")
    if num_classes:
        raise UsageError(f"DeLVM generates images, it has no classes (num_classes {num_classes}); pass 0")
    opts = {**{k: v for k, v in ARCH_DEFAULTS.items() if k != "lm"}, **kw, "channels": in_chans}
    return DelvmModel(VQVAE(VQConfig(**opts)), load_causal_lm(resolve_lm_dir(str(lm))))


ARCHS.register("delvm", arch_factory)
