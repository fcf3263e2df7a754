"""effai's own architectures, by name (card source `effai:<name>`), imported lazily.

A factory is called as `factory(num_classes=..., in_chans=..., **arch_kwargs)`; factories marked with
`takes_img_size` also get `img_size` (the card's input height), for models whose parameters depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from effai.registry import Registry

ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture")


def _ghostnetv3(factory: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        from effai.zoo import ghostnetv3

        return getattr(ghostnetv3, factory)(**kwargs)

    return build


for _w in ("050", "100", "130", "160"):
    ARCHS.register(f"ghostnetv3_{_w}", _ghostnetv3(f"ghostnetv3_{_w}"))


def _token(kind: str, name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        from effai.zoo import vit

        return getattr(vit, kind)(name, **kwargs)

    build.takes_img_size = True  # type: ignore[attr-defined]
    return build


for _name in ("vit_pico", "vit_tiny", "vit_small"):
    ARCHS.register(_name, _token("vit", _name))
ARCHS.register("mixer_pico", _token("mixer", "mixer_pico"))

# Trained composites (CDFKD-MFS's multi-header student, DeViT's fusion head) register themselves from their own
# modules (effai/zoo/cdfkd_student.py, devit_fusion.py): they build their backbones through effai.zoo.build.
