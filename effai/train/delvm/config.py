"""DelvmConfig: every knob of a DeLVM run (`effai train delvm`): the VQ tokenizer stage, the LM stage (tail mode,
optional logit KD from a larger LM trained first). Guo et al. 2024 (arXiv:2402.04841); sizes scaled to a CPU.
Defaults and measured numbers: docs/delvm.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from effai.data.visual_sentences import TAIL_MODES
from effai.errors import UsageError


@dataclass(frozen=True)
class DelvmConfig:
    data: str = "builtin"          # the built-in image set (digits: the same): scikit-learn digits + photo crops
    out: str = "runs/delvm"
    size: int = 16                 # image side; (size/4)^2 tokens per image
    images: int = 800              # training source images (head tasks use all)
    tail_count: int = 24           # distinct tail-task images (<= 5% of the training pairs)
    tail_mode: str = "augment"     # augment | repeat | none
    eval_images: int = 16          # held-out images per task for the evaluation
    codebook: int = 64
    code_dim: int = 32
    vq_hidden: int = 32
    vq_steps: int = 800
    vq_lr: float = 2e-3
    vq: str | None = None          # a trained vq.safetensors to reuse (skips the tokenizer stage)
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    steps: int = 800               # LM steps
    batch_size: int = 16
    lr: float = 3e-3
    kd: bool = False               # train a teacher LM first, then the LM with CE + kd_weight * logit KD
    teacher_hidden: int = 128
    teacher_layers: int = 3
    teacher_steps: int = 1600
    teacher: str | None = None     # a trained teacher LM dir (skips training it)
    kd_loss: str = "kd"            # a name in effai.train.losses.LOSSES
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.data not in ("builtin", "digits"):
            raise UsageError(f"--data {self.data}: DeLVM trains on the built-in image set only; pass --data builtin")
        if self.tail_mode not in TAIL_MODES:
            raise UsageError(f"unknown tail_mode '{self.tail_mode}'; choose from: {', '.join(TAIL_MODES)}")
        positive = {k: getattr(self, k) for k in ("size", "images", "eval_images", "codebook", "code_dim",
                                                  "vq_hidden", "lm_hidden", "lm_layers", "lm_heads", "steps",
                                                  "batch_size", "lr", "vq_lr", "teacher_hidden", "teacher_layers",
                                                  "teacher_steps", "kd_temperature")}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if bad:
            raise UsageError(f"delvm options must be positive: {', '.join(bad)}")
        if self.tail_count < 2 or self.tail_count > self.images:
            raise UsageError(f"tail_count {self.tail_count} must lie in 2..images ({self.images})")
        if self.tail_count > 0.05 * (3 * self.images + self.tail_count):
            raise UsageError(f"tail_count {self.tail_count} makes the tail over 5% of the training pairs; lower it "
                             f"to at most {int(0.05 * 3 * self.images / 0.95)}")
        if self.lm_hidden % self.lm_heads or self.teacher_hidden % self.lm_heads:
            raise UsageError(f"lm_hidden and teacher_hidden must be multiples of lm_heads {self.lm_heads}")
        if self.vq_steps < 0 or self.kd_weight < 0:
            raise UsageError("vq_steps and kd_weight must be >= 0")

    @property
    def tail_share(self) -> float:
        """The tail's natural share of the training pairs."""
        return self.tail_count / (3 * self.images + self.tail_count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
