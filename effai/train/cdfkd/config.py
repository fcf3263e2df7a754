"""CdfkdConfig: every knob of a CDFKD-MFS run (`effai train cdfkd`), with the paper's defaults where they apply.

Hao et al., arXiv:2205.11845. The iteration count and batch are scaled down for small data on CPUs; the schedule is
cosine. The paper's defaults: docs/distill.md, "effai/train/cdfkd/config.py".
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from effai.errors import UsageError
from effai.zoo.cdfkd_student import AGGREGATIONS


@dataclass(frozen=True)
class CdfkdConfig:
    teachers: tuple[str, ...] = ()      # effai training runs or .safetensors checkpoints (BatchNorm CNNs), >= 1
    teacher: str | None = None          # one more teacher (the CLI's --teacher), placed first in `teachers`
    student: str = "resnet10t"          # zoo/timm name of the shared backbone: a CNN with 4 downsampling stages
    student_channels: tuple[int, ...] = ()   # timm ResNet stage widths, e.g. (16, 32, 64, 128); (): the model's own
    data: str = "digits"                # ONLY the held-out evaluation and --real-samples; training sees no real image
    out: str = "runs/cdfkd"
    iterations: int = 2000              # each = student_steps student steps + 1 generator step (paper: 300 x 50)
    batch_size: int = 64                # generated images per step (paper: 256)
    lr: float = 0.1                     # student SGD, cosine to 0 over `iterations`
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gen_lr: float = 1e-3                # generator Adam, same cosine factor
    student_steps: int = 5              # student steps per generator step (the asymmetric adversarial game)
    nz: int = 256                       # generator noise width
    generator: str = "auto"             # auto | small | large | large_bn; auto: the reference's for the input size
                                        # (small below 128 px, large from 128, large_bn from 224; generator.py)
    input_size: int | None = None       # None: the teachers' own (they must agree); given: must equal theirs
    seed: int = 0                       # student/generator init and noise; the eval split follows the teachers' seed
    real_samples: int = 0               # real TRAIN-split images (stratified) that train the attention aggregation
    aggregation: str | None = None      # mean | attention; None: attention when real_samples > 0, else mean
    attention_steps: int = 200          # Adam steps of the attention module on the real samples (all else frozen)
    attention_lr: float = 0.01
    eval_every: int = 200               # held-out evaluation + atomic checkpoint every this many iterations
    feat_weight: float = 0.2            # L_S: pre-logits feature L1 weight
    ens_weight: float = 5.0             # L_S: ensemble (mean of headers vs mean of teachers) L1 weight
    adv_weight: float = 1.0             # L_G: weight of -L1(s_i, t_i)
    bn_weight: float = 0.1              # L_G: weight of the teachers' BatchNorm-statistics term
    bn_first_scale: float = 5.0         # r_l for the first BatchNorm of each teacher (others 1)
    val_fraction: float = 0.2           # the held-out split of `data` (stratified, seeded)
    resume: bool = False                # continue the unfinished run in `out` from its last checkpoint

    def __post_init__(self) -> None:
        teachers = tuple(self.teachers) if not isinstance(self.teachers, str) else (self.teachers,)
        if self.teacher:
            teachers = (self.teacher, *[t for t in teachers if t != self.teacher])
        object.__setattr__(self, "teachers", teachers)
        channels = self.student_channels
        if isinstance(channels, str):
            channels = tuple(v for v in channels.replace(",", " ").split())
        try:
            object.__setattr__(self, "student_channels", tuple(int(v) for v in channels))
        except ValueError:
            raise UsageError(f"student_channels {self.student_channels!r} must be 4 integers, e.g. 16,32,64,128"
                             ) from None
        if self.student_channels and (len(self.student_channels) != 4 or min(self.student_channels) < 1):
            raise UsageError(f"student_channels {self.student_channels} must be 4 positive widths, e.g. 16,32,64,128")
        if not teachers:
            raise UsageError("cdfkd needs teachers: --teachers RUN_DIR [RUN_DIR ...] (effai training runs or "
                             ".safetensors checkpoints of CNNs with BatchNorm trained on the same classes)")
        positive = {"iterations": self.iterations, "lr": self.lr, "gen_lr": self.gen_lr, "nz": self.nz,
                    "student_steps": self.student_steps, "eval_every": self.eval_every,
                    "attention_steps": self.attention_steps, "attention_lr": self.attention_lr}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if bad:
            raise UsageError(f"cdfkd options must be positive: {', '.join(bad)}")
        if self.batch_size < 2:
            raise UsageError(f"--batch-size {self.batch_size} is too small: BatchNorm statistics need >= 2 images "
                             "(64 is a good start)")
        if self.input_size is not None and (self.input_size % 4 or self.input_size < 8):
            raise UsageError(f"--input-size {self.input_size} must be a multiple of 4 and >= 8 (the generator "
                             "upsamples s/4 twice); leave it out to use the teachers' size")
        from effai.train.cdfkd.generator import generator_kind

        if self.input_size is not None:
            kind = generator_kind(self.generator, self.input_size)
            if kind != "small" and self.input_size % 16:
                raise UsageError(f"--input-size {self.input_size} must be a multiple of 16 for the {kind} generator "
                                 "(it upsamples s/16 four times); or --set generator=small")
        else:
            generator_kind(self.generator, 32)      # a known name; the size check waits for the teachers' size
        if self.real_samples < 0:
            raise UsageError(f"--real-samples {self.real_samples} must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"val_fraction {self.val_fraction} must lie in (0, 1)")
        agg = self.aggregation or ("attention" if self.real_samples > 0 else "mean")
        if agg not in AGGREGATIONS:
            raise UsageError(f"unknown aggregation '{agg}'; choose one of: {', '.join(AGGREGATIONS)}")
        if agg == "attention" and self.real_samples == 0:
            raise UsageError("aggregation=attention is trained on a few real images: add --real-samples N "
                             "(e.g. 50), or use aggregation=mean")
        if agg == "mean" and self.real_samples > 0:
            raise UsageError(f"--real-samples {self.real_samples} only trains the attention aggregation; drop it or "
                             "set aggregation=attention")
        object.__setattr__(self, "aggregation", agg)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}
