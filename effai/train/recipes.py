"""Training recipes: frozen dataclasses selectable by name (`effai train RECIPE`).

GhostNetV3's (Liu et al. 2024, arXiv:2404.11202; docs/ghostnetv3.md), vanilla KD (Hao et al. 2023, arXiv:2305.15781:
L = CE(z_s, y) + T^2 KL(p_t || p_s)) and OFA-KD (Hao et al. 2023, arXiv:2310.19444), with epoch counts scaled for
small data. Defaults: docs/distill.md, "effai/train/recipes.py".
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from effai.errors import UsageError
from effai.registry import Registry


@dataclass(frozen=True)
class TrainConfig:
    recipe: str
    student: str                        # zoo or timm name of the model to train
    data: str = "digits"                # 'digits', an ImageFolder directory, or a CIFAR-style .npz
    out: str = "runs/train"
    teacher: str | None = None          # path to an effai checkpoint (.safetensors / run dir) or zoo/timm name
    teacher_weights: str | None = None  # weights for a teacher given by name
    loss: str = "kd"                    # distillation loss when a teacher is given: kd | dkd | dist
    kd_weight: float = 1.0              # L = CE + kd_weight * L_kd (vanilla KD: 1 and 1)
    kd_temperature: float = 1.0         # T of kd and dkd, tau of dist (VanillaKD --temperature 1)
    dkd_alpha: float = 1.0              # DKD weight of TCKD (VanillaKD --dkd-alpha 1)
    dkd_beta: float = 2.0               # DKD weight of NCKD (VanillaKD --dkd-beta 2)
    dkd_warmup: int = 0                 # epochs over which the DKD term ramps up, min((epoch+1)/W, 1); 0: off
                                        # (VanillaKD has none; mdistiller's DKD uses 20 of 240 CIFAR epochs)
    dist_beta: float = 1.0              # DIST weight of the inter-class relation (VanillaKD --dist-beta 1)
    dist_gamma: float = 1.0             # DIST weight of the intra-class relation (VanillaKD --dist-gamma 1)
    epochs: int = 15
    batch_size: int = 64                # GLOBAL batch; split evenly over --nproc processes
    lr: float = 0.05                    # SGD learning rate per 128 images; scaled linearly to batch_size
    momentum: float = 0.9
    weight_decay: float = 2e-5          # not applied to biases and norm weights
    warmup_epochs: int = 1              # linear warmup, then cosine to 0 (paper: 3 of 300 epochs)
    label_smoothing: float = 0.1
    ema_decay: float = 0.99             # per-step EMA of weights; small data has few steps (~20 per epoch)
    input_size: int = 64                # training resolution (>= 64 for GhostNetV3's DFC gate)
    channels: int | None = None         # None: 1 for digits, else 3
    hflip: bool | None = None           # None: off for digits (a flipped 2 is not a 2), on otherwise
    jitter: float = 0.4                 # brightness/contrast jitter strength
    val_fraction: float = 0.2           # stratified held-out split, seeded
    seed: int = 0
    split_seed: int | None = None       # seed of the train/held-out split (None: `seed`); fix it to compare seeds
    num_branches: int = 3               # GhostNetV3 training-time conv branches (ablations: 1..N)
    scale_branch: bool = True           # GhostNetV3 1x1 'scale' branch in the cheap operation
    identity_bn: bool = True            # GhostNetV3 identity-BN branch in the cheap operation
    amp: bool = True                    # bf16 autocast where a GPU is present; CPU runs fp32
    fold: bool = True                   # fold the final model (effai.export.fold) before writing it
    optimizer: str = "auto"             # sgd | adamw | auto (adamw for token models, sgd otherwise)
    exits: tuple[str, ...] = ()         # OFA: student module paths to distil from (default: its last 4 stages)
    ofa_eps: tuple[float, ...] = (1.0,)  # OFA target enhancement: one value, or one per exit then the final logits
    ofa_temperature: float = 1.0
    ofa_weight: float = 1.0             # weight of every OFA term next to CE (the paper: 1)

    def resolved(self) -> TrainConfig:
        digits = self.data == "digits"
        return replace(self, channels=self.channels or (1 if digits else 3),
                       hflip=(not digits) if self.hflip is None else self.hflip)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


RECIPES: Registry[TrainConfig] = Registry("recipe")
RECIPES.register("ghostnetv3", TrainConfig(recipe="ghostnetv3", student="ghostnetv3_050"))
RECIPES.register("kd", TrainConfig(recipe="kd", student="ghostnetv3_050"))
RECIPES.register("supervised", TrainConfig(recipe="supervised", student="resnet18", teacher=None, lr=0.1))
RECIPES.register("ofa", TrainConfig(recipe="ofa", student="ghostnetv3_050"))

# Families (prefixes of timm / zoo family names: deit3, swinv2, eva02 ... included) trained with AdamW.
TOKEN_FAMILIES = ("vit", "deit", "mixer", "swin", "beit", "cait", "eva", "xcit", "resmlp", "gmlp", "flexivit",
                  "crossvit", "pvt", "twins", "volo", "mvit", "levit", "tnt", "convit", "hiera", "davit", "maxvit")
ADAMW = {"lr": 1e-3, "weight_decay": 0.05}


def make_config(recipe: str, **overrides: Any) -> TrainConfig:
    """The recipe's defaults with the user's overrides (None values keep the default)."""
    base = RECIPES.get(recipe)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise UsageError(f"unknown training options {sorted(unknown)}; valid: {', '.join(sorted(known))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = replace(base, **given)
    if cfg.optimizer not in ("auto", "sgd", "adamw"):
        raise UsageError(f"optimizer '{cfg.optimizer}' is not one of: auto, sgd, adamw")
    if cfg.optimizer == "auto":
        from effai import zoo

        token = zoo.resolve_card(cfg.student).family.startswith(TOKEN_FAMILIES)
        cfg = replace(cfg, optimizer="adamw" if token else "sgd")
        if token:
            cfg = replace(cfg, **{k: v for k, v in ADAMW.items() if k not in given})
    if cfg.recipe in ("kd", "ofa") and not cfg.teacher:
        raise UsageError(f"recipe '{cfg.recipe}' needs --teacher (a checkpoint path, or a model name with "
                         "--teacher-weights)")
    if cfg.recipe == "supervised" and cfg.teacher:
        raise UsageError("recipe 'supervised' trains without a teacher; use recipe 'kd' or 'ghostnetv3' to distil")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise UsageError("--epochs, --batch-size and --lr must be positive")
    if cfg.kd_temperature <= 0:
        raise UsageError(f"kd_temperature {cfg.kd_temperature} must be > 0 (VanillaKD: 1; DKD's CIFAR setting: 4)")
    negative = {k: getattr(cfg, k) for k in ("kd_weight", "dkd_alpha", "dkd_beta", "dkd_warmup", "dist_beta",
                                              "dist_gamma") if getattr(cfg, k) < 0}
    if negative:
        raise UsageError(f"loss weights must be >= 0: {', '.join(f'{k}={v}' for k, v in negative.items())}")
    if cfg.input_size < 16:
        raise UsageError(f"--input-size {cfg.input_size} is too small; use >= 64 for GhostNetV3")
    return cfg.resolved()
