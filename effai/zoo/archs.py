"""effai's own architectures, by name (card source `effai:<name>`), imported lazily."""

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
