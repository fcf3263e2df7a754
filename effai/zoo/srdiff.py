"""SRDiff (Li et al. 2022, arXiv:2104.14951) at tiny size, and SAM-DiffSR's structural position encoding (SPE;
Wang et al. 2024, arXiv:2402.17133): an LR encoder, a conditional UNet predicting the noise of the HR residual, the
noise schedule, and the mask encoding that modulates the training noise. Formulas in each function's docstring.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import UsageError
from effai.zoo.archs import ARCHS

SCHEDULES = ("cosine", "linear")
SPE_KINDS = ("rope", "sincos")
RES_RESCALE = 2.0   # SRDiff's res_rescale: x0 = (HR - up(LR)) * 2 with images in [-1, 1], clipped to [-1, 1]


@dataclass(frozen=True)
class SRDiffSpec:
    """Everything that rebuilds an SRDiff model (stored in its checkpoint's metadata as `effai.srdiff`)."""

    scale: int = 2             # upscaling factor the model is trained for (2 or 4)
    lr_size: int = 16          # LR tile side the model is trained and exported at; HR tile = lr_size * scale
    enc_channels: int = 16     # LR encoder width (RRDB nf)
    enc_blocks: int = 2        # RRDB blocks
    growth: int = 8            # RRDB dense growth (gc)
    unet_channels: int = 16    # UNet base width; levels use 1x and 2x
    timesteps: int = 100       # T (SRDiff: 100)
    schedule: str = "cosine"   # cosine (Nichol & Dhariwal 2021, s=0.008) | linear (1e-4 .. 0.02)

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4, 8):
            raise UsageError(f"scale {self.scale} is not supported; choose from: 2, 3, 4, 8")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule '{self.schedule}'; choose from: {', '.join(SCHEDULES)}")
        if self.lr_size < 4 or (self.lr_size * self.scale) % 2:
            raise UsageError(f"lr_size {self.lr_size} must be >= 4 with an even HR side (lr_size * scale)")
        if self.timesteps < 2:
            raise UsageError(f"timesteps {self.timesteps} must be >= 2")

    @property
    def hr_size(self) -> int:
        return self.lr_size * self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------- schedule

def betas(schedule: str, timesteps: int) -> np.ndarray:
    """beta_1..beta_T (float64). cosine: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2) / abar(0), s = 0.008,
    beta_t = 1 - abar(t)/abar(t-1) clipped to [0, 0.999] (Nichol & Dhariwal 2021, SRDiff's default);
    linear: beta_t evenly from 1e-4 to 0.02 (Ho et al. 2020)."""
    if schedule == "cosine":
        s, steps = 0.008, timesteps + 1
        x = np.linspace(0, steps, steps)
        ac = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
        ac = ac / ac[0]
        return np.clip(1 - ac[1:] / ac[:-1], 0, 0.999)
    if schedule == "linear":
        return np.linspace(1e-4, 0.02, timesteps, dtype=np.float64)
    raise UsageError(f"unknown schedule '{schedule}'; choose from: {', '.join(SCHEDULES)}")


MIN_STEPS, MAX_STEPS = 1, 50     # DDIM sampler steps (effai/superres/sampler.py)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (rounded, distinct): the DDIM sampler's visits."""
    if not MIN_STEPS <= steps <= min(MAX_STEPS, T):
        raise UsageError(f"--steps {steps} must be between {MIN_STEPS} and {min(MAX_STEPS, T)}")
    return [int(t) for t in np.unique(np.linspace(0, T - 1, steps).round().astype(int))[::-1]]


def alphas_cumprod(spec: SRDiffSpec) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1 (float64)."""
    return np.cumprod(1.0 - betas(spec.schedule, spec.timesteps))


def spe_coefficient(spec: SRDiffSpec) -> np.ndarray:
    """SAM-DiffSR's per-step weight of the encoded mask: c_t = sqrt(1 - abar_t) * beta_t (its `mask_coefficient`)."""
    b = betas(spec.schedule, spec.timesteps)
    return np.sqrt(1.0 - np.cumprod(1.0 - b)) * b


# ------------------------------------------------------------------------------------------- structural encoding

def position_map(h: int, w: int, kind: str = "rope") -> np.ndarray:
    """The position embedding P (h x w) a region's code is read from.

    rope (the reference code's choice): rotary embedding of an all-ones (h x w) map, rows as positions p and the w
    columns as features in interleaved pairs (2i, 2i+1) with theta_i = 10000^(-2i/w):
        P[p, 2i] = cos(p theta_i) - sin(p theta_i),   P[p, 2i+1] = cos(p theta_i) + sin(p theta_i)
    (an odd last column stays 1). sincos: P[r, c] = sin(v_c) * cos(sin(v_r)), v_i = 1 / 0.001^(2i/w)."""
    if kind == "rope":
        half = w // 2
        theta = 10000.0 ** (-np.arange(half) * 2.0 / w)
        ang = np.arange(h)[:, None] * theta[None, :]
        p = np.ones((h, w), np.float64)
        p[:, 0:2 * half:2] = np.cos(ang) - np.sin(ang)
        p[:, 1:2 * half:2] = np.cos(ang) + np.sin(ang)
        return p
    if kind == "sincos":
        v = 1.0 / np.power(0.001, 2.0 * np.arange(max(h, w)) / w)
        return np.sin(v[None, :w]) * np.cos(np.sin(v[:h, None]))
    raise UsageError(f"unknown SPE encoding '{kind}'; choose from: {', '.join(SPE_KINDS)}")


def encode_masks(labels: np.ndarray, kind: str = "rope") -> np.ndarray:
    """The encoded mask E (h x w, float32) of a segmentation label map (one integer id per region; id < 0 = no
    region): every pixel of region R gets e_R = (1 / (h w)) * sum_{p in R} P(p), the mean over the image of P
    masked to R (SAM-DiffSR's merge of SAM masks into one map). Pixels in no region get 0."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise UsageError(f"a mask label map must be 2-D (h x w), got shape {labels.shape}")
    h, w = labels.shape
    p = position_map(h, w, kind)
    flat = labels.reshape(-1).astype(np.int64)
    out = np.zeros(h * w, np.float64)
    valid = flat >= 0
    if valid.any():
        ids, inv = np.unique(flat[valid], return_inverse=True)
        sums = np.bincount(inv, weights=p.reshape(-1)[valid], minlength=len(ids))
        out[valid] = sums[inv] / (h * w)
    return out.reshape(h, w).astype(np.float32)


def modulated_noise(noise: torch.Tensor, encoded: torch.Tensor | None, t: torch.Tensor, coef: torch.Tensor,
                    strength: float = 1.0) -> torch.Tensor:
    """SAM-DiffSR's training noise: eps' = eps + strength * c_t * E, E (N,1,h,w) resized bilinearly to the noise's
    size and broadcast over channels; the mean of the noise in region R moves to strength * c_t * e_R. With
    E = None or strength = 0 it returns `noise` itself, so training is SRDiff's exactly."""
    if encoded is None or strength == 0:
        return noise
    e = encoded if encoded.shape[-2:] == noise.shape[-2:] else F.interpolate(
        encoded, noise.shape[-2:], mode="bilinear", align_corners=False)
    return noise + strength * coef[t].view(-1, 1, 1, 1).to(noise.dtype) * e


# ------------------------------------------------------------------------------------------------------- networks

class _DenseBlock(nn.Module):
    """Residual dense block (ESRGAN): 3 convs on the concatenation of all earlier outputs, 0.2-scaled residual."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.c2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.c3 = nn.Conv2d(nf + 2 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.c1(x), 0.2)
        x2 = F.leaky_relu(self.c2(torch.cat((x, x1), 1)), 0.2)
        return x + 0.2 * self.c3(torch.cat((x, x1, x2), 1))


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.b1, self.b2 = _DenseBlock(nf, gc), _DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.b2(self.b1(x))


class LREncoder(nn.Module):
    """SRDiff's conditioning network: a small RRDB trunk on the LR image (N,3,h,w) in [-1,1] -> features (N,C,h,w)."""

    def __init__(self, spec: SRDiffSpec) -> None:
        super().__init__()
        nf = spec.enc_channels
        self.first = nn.Conv2d(3, nf, 3, 1, 1)
        self.blocks = nn.Sequential(*[_RRDB(nf, spec.growth) for _ in range(spec.enc_blocks)])
        self.trunk = nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        f = self.first(lr)
        return f + self.trunk(self.blocks(f))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (float) timestep: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - 1)))
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat((torch.sin(args), torch.cos(args)), 1)


class _ResBlock(nn.Module):
    """conv-SiLU, + time projection, conv-SiLU, 1x1 skip when widths differ (no normalization: export-friendly)."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.t = nn.Linear(tdim, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.c1(x)) + self.t(temb)[:, :, None, None]
        return F.silu(self.c2(h)) + self.skip(x)


class Denoiser(nn.Module):
    """SRDiff's conditional UNet, two levels: eps_theta(x_t, t, cond). The LR features are brought to HR size by a
    transposed conv (kernel 2s, stride s, padding s/2, SRDiff's cond_proj) and added after the first conv."""

    def __init__(self, spec: SRDiffSpec) -> None:
        super().__init__()
        c, s = spec.unet_channels, spec.scale
        self.tdim = c * 4
        self.time = nn.Sequential(nn.Linear(c, self.tdim), nn.SiLU(), nn.Linear(self.tdim, self.tdim))
        self.cond_proj = nn.ConvTranspose2d(spec.enc_channels, c, 2 * s, s, s // 2)   # odd s: 1 extra row, cropped
        self.first = nn.Conv2d(3, c, 3, 1, 1)
        self.down1 = _ResBlock(c, c, self.tdim)
        self.pool = nn.Conv2d(c, c, 3, 2, 1)
        self.down2 = _ResBlock(c, 2 * c, self.tdim)
        self.mid = _ResBlock(2 * c, 2 * c, self.tdim)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(3 * c, c, self.tdim)
        self.out = nn.Conv2d(c, 3, 3, 1, 1)
        self.base = c

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.base))
        cp = self.cond_proj(cond)
        h0 = self.first(x) + cp[..., : x.shape[-2], : x.shape[-1]]
        h1 = self.down1(h0, temb)
        h2 = self.mid(self.down2(self.pool(h1), temb), temb)
        h = self.up1(torch.cat((self.up(h2), h1), 1), temb)
        return self.out(F.silu(h))


class SRDiff(nn.Module):
    """The trained pair: `encoder` (LR -> cond) and `denoiser` (x_t, t, cond -> eps), plus the schedule buffers.

    Training (SRDiff, Li et al. 2022): x0 = clip((HR - up(LR)) * 2, -1, 1), t ~ U{0..T-1}, eps ~ N(0, I),
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = |eps - eps_theta(x_t, t, E(LR))|_1. SAM-DiffSR replaces
    eps by the modulated eps' = eps + c_t * E_mask in both x_t and the target (`modulated_noise`); sampling is
    unchanged and needs no masks."""

    def __init__(self, spec: SRDiffSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = LREncoder(spec)
        self.denoiser = Denoiser(spec)
        self.register_buffer("abar", torch.tensor(alphas_cumprod(spec), dtype=torch.float32), persistent=False)
        self.register_buffer("spe_coef", torch.tensor(spe_coefficient(spec), dtype=torch.float32), persistent=False)

    def loss(self, hr: torch.Tensor, lr: torch.Tensor, lr_up: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             encoded: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        """The L1 noise-prediction loss above, for given t and eps (so runs are reproducible and comparable)."""
        x0 = ((hr - lr_up) * RES_RESCALE).clamp(-1, 1)
        eps = modulated_noise(noise, encoded, t, self.spe_coef, strength)
        ab = self.abar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = self.denoiser(x_t, t.float(), self.encoder(lr))
        return (eps - pred).abs().mean()


class DenoiserStep(nn.Module):
    """The exported step: (x_t (1,3,H,W), t (1,) float, cond (1,C,h,w)) -> eps (1,3,H,W)."""

    def __init__(self, model: SRDiff) -> None:
        super().__init__()
        self.denoiser = model.denoiser

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t, cond)


def build(spec: SRDiffSpec | dict[str, Any] | None = None) -> SRDiff:
    if isinstance(spec, dict):
        known = set(SRDiffSpec.__dataclass_fields__)
        spec = SRDiffSpec(**{k: v for k, v in spec.items() if k in known})
    return SRDiff(spec or SRDiffSpec())


# Trained defaults shipped in effai/zoo/weights/ (docs/superres.md says how they were trained).
DEFAULTS = {"srdiff_x2": "srdiff_x2_samdiffsr.safetensors"}


def load(path: Any) -> tuple[SRDiff, dict[str, Any]]:
    """A trained SRDiff from `model.safetensors` (or its run dir, or a DEFAULTS name): the spec from the file's
    `effai.srdiff` metadata, the tensors checked against it. Returns (model in eval mode, the metadata as dicts)."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(__file__).parent / "weights" / DEFAULTS[str(path)] if str(path) in DEFAULTS else Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise UsageError(f"no SRDiff weights at {path}; pass a run dir of `effai train sr` or its model.safetensors")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        spec_json = meta.get("effai.srdiff")
        if spec_json is None:
            raise UsageError(f"{p} is not an SRDiff checkpoint (no effai.srdiff metadata); train one with "
                             "`effai train sr`")
        spec = json.loads(spec_json)
        model = build(spec)
        state = load_file(str(p))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot read {p} as an SRDiff checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{p} does not match its SRDiff spec (missing {list(missing)[:3]}, unexpected "
                         f"{list(unexpected)[:3]}); retrain or pass the right file")
    extra = {}
    for k, v in meta.items():
        if k.startswith("effai."):
            try:
                extra[k[len("effai."):]] = json.loads(v)
            except ValueError:
                pass
    return model.eval(), extra


# --- the zoo's card srdiff_x2 (ARCHS "srdiff", task image-super-resolution) -------------------------------------------

ARCH_STEPS = 8      # `effai sr`'s default DDIM steps, for the card's forward (params/MACs of one LR tile)


class SRDiffSampler(SRDiff):
    """SRDiff as one zoo module: forward(lr (B,3,h,w) in [-1, 1]) -> HR (B,3,h*s,w*s) in [-1, 1] of one trained tile:
    HR = up(LR) + x0 / 2 after `steps` deterministic DDIM steps (effai/superres/sampler.py) from the initial noise
    `effai sr` draws for a one-tile image (numpy default_rng(0), a fixed buffer, so the forward traces and exports
    as one graph), with torch's bicubic as up(). Its state dict is SRDiff's (the bundled file loads into it as is).
    It counts params and MACs for `effai zoo`, and `effai export srdiff_x2` lowers it as a one-tile model; real use
    is `effai sr` (tiled, any size, PIL bicubic) and `effai sr export` (encoder + step, the loop in the runtime)."""

    def __init__(self, spec: SRDiffSpec, steps: int = ARCH_STEPS) -> None:
        super().__init__(spec)
        self.steps = steps
        noise = np.random.default_rng(0).standard_normal((3, spec.hr_size, spec.hr_size)).astype(np.float32)
        self.register_buffer("noise", torch.from_numpy(noise)[None], persistent=False)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        s = self.spec.scale
        up = F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False)
        cond = self.encoder(lr)
        if tuple(up.shape[-2:]) != tuple(self.noise.shape[-2:]):
            raise UsageError(f"SRDiffSampler takes one {self.spec.lr_size}x{self.spec.lr_size} LR tile, got "
                             f"{tuple(lr.shape[-2:])}; for any size use `effai sr` (tiled)")
        x = self.noise.to(device=lr.device, dtype=lr.dtype).expand(lr.shape[0], -1, -1, -1)
        x0 = x
        ts = ddim_timesteps(self.spec.timesteps, self.steps)
        for i, t in enumerate(ts):
            eps = self.denoiser(x, torch.full((lr.shape[0],), float(t), device=lr.device), cond)
            ab = self.abar[t]
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            ab_next = self.abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=lr.device)
            x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
        return (up + x0 / RES_RESCALE).clamp(-1, 1)


def arch_factory(num_classes: int = 0, in_chans: int = 3, img_size: int = 16, steps: int = ARCH_STEPS,
                 **spec: Any) -> SRDiffSampler:
    """ARCHS' `srdiff`: the card's arch_kwargs are an SRDiffSpec (lr_size from the card's input size)."""
    unknown = sorted(set(spec) - set(SRDiffSpec.__dataclass_fields__))
    if unknown:
        raise UsageError(f"unknown SRDiff options {unknown}; valid: {', '.join(SRDiffSpec.__dataclass_fields__)}")
    if num_classes or in_chans != 3:
        raise UsageError(f"SRDiff maps RGB images to RGB images (num_classes {num_classes}, in_chans {in_chans}); "
                         "pass 0 classes and 3 channels")
    return SRDiffSampler(SRDiffSpec(**{**spec, "lr_size": img_size}), steps)


arch_factory.takes_img_size = True  # type: ignore[attr-defined]
ARCHS.register("srdiff", arch_factory)
