"""A card from a name (the zoo's, or timm's pretrained config) and a randomly initialized model from a card."""

from __future__ import annotations

from torch import nn

from effai.errors import EffaiError, UsageError
from effai.zoo.archs import ARCHS
from effai.zoo.card import IMAGENET_MEAN, IMAGENET_STD, ModelCard
from effai.zoo.catalog import CARDS


def resolve_card(name: str) -> ModelCard:
    """A zoo card by name, or a card derived from timm's pretrained config for any other timm model."""
    if name in CARDS:
        return CARDS.get(name)
    import timm

    if timm.is_model(name):
        return _card_from_timm(name)
    import difflib

    timm_names = timm.list_models()
    close = (difflib.get_close_matches(name, CARDS.names(), n=1, cutoff=0.6)
             or difflib.get_close_matches(name, timm_names, n=1, cutoff=0.6))
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"unknown model '{name}'; {hint}the zoo has: {', '.join(CARDS.names())}; any of timm's "
                     f"{len(timm_names)} model names works too, or --model-def path/file.py:Class")


def _card_from_timm(name: str) -> ModelCard:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    c = cfg.to_dict() if cfg is not None else {}
    size = tuple(c.get("input_size", (3, 224, 224)))
    nc = int(c.get("num_classes", 1000) or 1000)
    return ModelCard(name=name, family=name.split("_")[0], source=f"timm:{name}", input_size=size,  # type: ignore[arg-type]
                     mean=tuple(c.get("mean", IMAGENET_MEAN)), std=tuple(c.get("std", IMAGENET_STD)),
                     interpolation=c.get("interpolation", "bilinear"), crop_pct=float(c.get("crop_pct", 0.875)),
                     num_classes=nc, label_set="imagenet-1k" if nc == 1000 else None,
                     weights_license=c.get("license", "unknown"), description=f"timm model {name} (not in effai's zoo)")


def build(card: ModelCard) -> nn.Module:
    """A randomly initialized model as the card describes it (classes, input channels, architecture options)."""
    kind, _, ref = card.source.partition(":")
    kwargs = dict(card.extra.get("arch_kwargs", {}))
    if kind == "effai":
        factory = ARCHS.get(ref)
        if getattr(factory, "takes_img_size", False):
            kwargs["img_size"] = card.input_size[1]
        try:
            return factory(num_classes=card.num_classes, in_chans=card.input_size[0], **kwargs)
        except TypeError as e:
            raise UsageError(f"{card.name} ({card.source}) cannot be built with options {sorted(kwargs)}: {e}; the "
                             "checkpoint's card does not fit this architecture") from e
    if kind == "timm":
        import timm

        try:
            return timm.create_model(ref, pretrained=False, num_classes=card.num_classes,
                                     in_chans=card.input_size[0], **kwargs)
        except TypeError as e:
            raise UsageError(f"{card.name} ({card.source}) cannot be built with options {sorted(kwargs)}: {e}; the "
                             "checkpoint's card does not fit this architecture") from e
    raise EffaiError(f"card {card.name} has source '{card.source}', which the zoo cannot build")
