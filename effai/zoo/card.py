"""ModelCard: everything an exported artifact must carry about its model besides the weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a card's model does: image-classification (one forward, class scores: effai export to every target, effai
# predict, bundles) or visual-question-answering (an image + a question -> generated text: effai generate, exported
# with `effai export --target executorch` as a vision program + KV-cache decoder) or image-to-image-in-context (an
# example pair + a query image -> the generated output image, DeLVM: effai delvm export, effai generate
# --prompt-images) or image-super-resolution (an LR image -> the HR image, SRDiff / SAM-DiffSR: effai sr, effai sr
# export).
TASKS = ("image-classification", "visual-question-answering", "image-to-image-in-context", "image-super-resolution")


@dataclass(frozen=True)
class ModelCard:
    """What the zoo knows about one model: how to build it, what it eats, what its outputs mean.

    `name` follows timm's `arch.tag` convention ("ghostnetv3_100", "ghostnetv3_050.digits").
    """

    name: str
    family: str                                   # "ghostnetv3", "mobilenetv3", ... (groups `zoo list`)
    source: str                                   # how it is built: "timm:<name>", "module:<file>:<obj>"
    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W) of one image; batch is an export option
    mean: tuple[float, ...] = IMAGENET_MEAN       # per-channel, applied to pixels scaled to [0, 1]
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"               # resize filter used by the reference preprocessing
    crop_pct: float = 0.875                       # resize shorter side to size/crop_pct, then centre-crop
    channel_order: str = "RGB"
    num_classes: int = 1000
    task: str = "image-classification"            # one of TASKS: what the outputs are (class scores or text)
    label_set: str | None = "imagenet-1k"         # named label list (see zoo.labels), None when unknown
    weights_license: str = "unknown"              # licence of the pretrained weights (random-init has none)
    reparameterizable: bool = False               # has training-time branches that fold() merges
    description: str = ""
    bundled_weights: str | None = None            # file inside effai/zoo/weights shipped with the package
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def with_(self, **changes: Any) -> ModelCard:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The card as effai's checkpoints carry it (`effai.card` metadata, JSON): what rebuilds the model and
        preprocesses its input; the architecture options are `arch_kwargs`."""
        return {"name": self.name, "family": self.family, "source": self.source, "input_size": list(self.input_size),
                "mean": list(self.mean), "std": list(self.std), "num_classes": self.num_classes,
                "task": self.task, "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "arch_kwargs": dict(self.extra.get("arch_kwargs", {}))}

    @classmethod
    def from_dict(cls, d: dict[str, Any], **changes: Any) -> ModelCard:
        """The inverse of `to_dict` for an already validated dict (checkpoint metadata is validated by
        effai.zoo.card_from_checkpoint first); `changes` override fields (description, extra, ...)."""
        card = cls(name=d["name"], family=d.get("family", "trained"), source=d["source"],
                   input_size=tuple(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),  # type: ignore[arg-type]
                   interpolation=d.get("interpolation", "bilinear"), crop_pct=float(d.get("crop_pct", 1.0)),
                   num_classes=int(d["num_classes"]), label_set=None,
                   task=_task(d.get("task", "image-classification")),   # checkpoints before the field: classifiers
                   extra={"arch_kwargs": dict(d.get("arch_kwargs", {}))})
        return card.with_(**changes) if changes else card

    def preprocessing(self) -> dict[str, Any]:
        """The manifest's `preprocessing` block: how an app must turn a photo into the model input."""
        c, h, w = self.input_size
        return {
            "input_size": [h, w],
            "channels": c,
            "channel_order": self.channel_order if c == 3 else "gray (luma 0.299 R + 0.587 G + 0.114 B)",
            "layout": "NCHW",
            "scale": 1.0 / 255.0,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "recipe": "x = (pixel/255 - mean) / std after resizing the shorter side to size/crop_pct and centre-cropping",
        }


def _task(v: object) -> str:
    if v not in TASKS:
        raise ValueError(f"task {str(v)[:40]!r} is not one of {', '.join(TASKS)}")
    return v  # type: ignore[return-value]
