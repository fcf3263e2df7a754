"""DeViT's training configuration (`effai train devit ...`; every field also takes `--set key=value`).

Defaults follow the reference (falcon-xu/DeViT): split seed 42, alpha 0.5, gammas (0.2, 0.1, 0.3), AdamW with cosine
decay and weight decay 0.05 (DeiT's), label smoothing 0.1, mixup 0.8 / cutmix 1.0, fresh sub-teacher heads. Epoch counts and the learning rate are set for small data
(few steps per epoch): on digits, 10 ensemble epochs at lr 1e-3 reach 95.8% held-out with 2 parts where 4 epochs at
the reference 5e-4 reach 90.8% (teacher 98.3%). Pruning (stage 2) is off unless prune_neurons or prune_heads > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from effai.errors import UsageError


@dataclass(frozen=True)
class DevitConfig:
    teacher: str = ""                   # effai run dir / .safetensors of a timm ViT trained on --data (required)
    parts: int = 2                      # N devices = N class subsets = N sub-models
    student: str = "vit_pico"           # sub-model architecture (a ViT: its middle block's Q/K/V is distilled)
    student_weights: str | None = None  # effai checkpoint of `student` to start every sub-model from (the paper
                                        # starts from ImageNet-pretrained DeiT-Ti); None: random init
    data: str = "digits"                # 'digits', an ImageFolder directory, or a CIFAR-style .npz
    out: str = "runs/devit"
    epochs: int = 6                     # DEKD epochs per sub-model (over its subset)
    finetune_epochs: int = 3            # stage 1: sub-teacher fine-tuning epochs (over its subset)
    ensemble_epochs: int = 10           # stage 4: sub-models + fusion head trained jointly (over all classes)
    batch_size: int = 64
    lr: float = 1e-3                    # AdamW, DEKD and ensemble stages (reference: 5e-4 over many more steps)
    finetune_lr: float = 2e-4           # AdamW, sub-teacher fine-tuning (starts from the trained teacher)
    weight_decay: float = 0.05          # not applied to biases, norms, position embeddings and tokens
    warmup_epochs: int = 1              # linear warmup, then cosine to 0, in every stage
    input_size: int | None = None       # None: the teacher's input size (sub-models see the teacher's images)
    patch_size: int | None = None       # sub-model patch size; None: the teacher's (DEKD needs equal token counts)
    seed: int = 42                      # class-split seed (the paper's 42); also init, data order, augmentation
    val_seed: int | None = None         # held-out split seed; None: the teacher's own (its held-out images stay unseen)
    val_fraction: float = 0.2
    alpha: float = 0.5                  # weight of the hard-KD term against CE (DEKD and ensemble)
    gammas: tuple[float, float, float] = (0.2, 0.1, 0.3)   # weights of R_Q, R_K, R_V
    prune_neurons: float = 0.0          # stage 2 (optional): fraction of every block's MLP neurons to remove
    prune_heads: float = 0.0            # stage 2 (optional): fraction of every block's attention heads to remove
    prune_epochs: int = 3               # DEKD epochs that recover the accuracy after pruning (over the subset)
    prune_images: int = 256             # training images of the part that the neurons and heads are ranked on
    feature_weight: float = 1.0         # weight of MSE(projected fused CLS, teacher CLS) in the ensemble stage
    label_smoothing: float = 0.1        # on the CE(z, y) terms (reference base criterion)
    jitter: float = 0.2                 # brightness/contrast augmentation; translation is always on
    hflip: bool | None = None           # None: off for digits (a flipped 2 is not a 2), on otherwise
    mixup: float = 0.8                  # Beta(a, a) mixup in stages 1 and 3, as the reference (0: off)
    cutmix: float = 1.0                 # Beta(a, a) cutmix in stages 1 and 3, as the reference (0: off); with both,
                                        # each batch takes one of them with probability 1/2
    relation_mode: str = "reference"    # DEKD relation scale: reference (KL summed over rows / batch / student
                                        # depth) | token_mean (effai's earlier choice: averaged over rows)
    sub_teacher_head: str = "fresh"     # stage 1 head: fresh (reference) | teacher_rows (the teacher's rows)

    def __post_init__(self) -> None:
        if not self.teacher:
            raise UsageError("devit needs --teacher: the run dir or .safetensors of a ViT (vit_tiny, vit_small, ...) "
                             "trained by effai on the same --data")
        if self.parts < 1:
            raise UsageError(f"--parts {self.parts} must be >= 1")
        from effai.train.devit.prune import check_ratios

        check_ratios(self.prune_neurons, self.prune_heads)
        if self.prune_images < 2:
            raise UsageError(f"prune_images {self.prune_images} must be >= 2 (HSIC compares images with each other)")
        for name in ("epochs", "finetune_epochs", "ensemble_epochs", "prune_epochs"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} {getattr(self, name)} must be >= 0")
        if self.batch_size < 2 or self.lr <= 0 or self.finetune_lr <= 0:
            raise UsageError("--batch-size must be >= 2 and --lr / finetune_lr positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"alpha {self.alpha} must lie in [0, 1] (weight of hard KD against CE)")
        if len(self.gammas) != 3 or min(self.gammas) < 0:
            raise UsageError(f"gammas {self.gammas} must be three weights >= 0 for R_Q, R_K, R_V, like 0.2,0.1,0.3")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"val_fraction {self.val_fraction} must lie in (0, 1)")
        if self.mixup < 0 or self.cutmix < 0:
            raise UsageError(f"mixup {self.mixup} / cutmix {self.cutmix} must be >= 0 (Beta parameters; 0 turns off)")
        from effai.train.devit.dekd import check_mode

        check_mode(self.relation_mode)
        if self.sub_teacher_head not in ("fresh", "teacher_rows"):
            raise UsageError(f"sub_teacher_head '{self.sub_teacher_head}' is not one of: fresh, teacher_rows")
        if self.input_size is not None and self.input_size < 8:
            raise UsageError(f"--input-size {self.input_size} is too small for a patch grid; use >= 16")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}
