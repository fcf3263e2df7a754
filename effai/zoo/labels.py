"""Named label sets, resolved offline (timm ships the ImageNet-1k class names)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def label_set(name: str | None, num_classes: int) -> tuple[str, ...]:
    """Class names for `name`, or generic 'class_<i>' names when the set is unknown or the size disagrees."""
    names: tuple[str, ...] | None = None
    if name == "imagenet-1k":
        from timm.data import ImageNetInfo

        names = tuple(ImageNetInfo().label_descriptions(as_dict=False))
    elif name == "digits":
        names = tuple(str(i) for i in range(10))
    if names is None or len(names) != num_classes:
        return tuple(f"class_{i}" for i in range(num_classes))
    return names
