"""Feature capture by module path, for every feature-level recipe (OFA-KD exits, CDFKD-MFS stages, DeViT tokens).

`with FeatureCapture(model, ["layer1", "layer4"]) as cap: logits = model(x)`, then `cap.outputs` in the order the
paths were given; hooks are removed on exit. `stage_exits(model)` picks the outputs of the model's 4 stages from
timm's `feature_info`. See docs/distill.md, "Feature capture by module path".
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from effai.errors import UsageError


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`, or a UsageError naming the closest existing paths."""
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    prefix = path.rsplit(".", 1)[0] if "." in path else ""
    siblings = [n for n in names if n.startswith(prefix + ".") and n.count(".") == path.count(".")][:6] if prefix else []
    hint = close or siblings or [n for n in names if "." not in n][:8]
    raise UsageError(f"{type(model).__name__} has no module '{path}'; close matches: {', '.join(hint)} "
                     "(paths are named_modules() names, e.g. 'blocks.3' or 'layer2')")


class FeatureCapture:
    """Forward hooks that keep the output (or first input) of each module path during a forward pass."""

    def __init__(self, model: nn.Module, paths: Sequence[str], where: str = "output", detach: bool = False) -> None:
        if where not in ("output", "input"):
            raise ValueError(f"where must be 'output' or 'input', got {where!r}")
        self.paths = list(paths)
        self.modules = [resolve_module(model, p) for p in self.paths]
        self.where, self.detach = where, detach
        self._store: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureCapture:
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            value = args[0] if self.where == "input" else output
            if isinstance(value, (tuple, list)):
                value = value[0]
            self._store[i] = value.detach() if self.detach else value
        return hook

    @property
    def outputs(self) -> list[torch.Tensor]:
        missing = [self.paths[i] for i in range(len(self.paths)) if i not in self._store]
        if missing:
            raise UsageError(f"modules {missing} did not run in the forward pass; choose modules on the path from "
                             "input to output (e.g. --set exits=... with the model's stage paths)")
        return [self._store[i] for i in range(len(self.paths))]

    def clear(self) -> None:
        self._store.clear()


def feature_info(model: nn.Module) -> list[dict[str, Any]]:
    """timm-style feature_info as a list of dicts (module, num_chs, reduction); [] when the model has none."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "get_dicts"):   # timm's FeatureInfo (features_only models)
        return list(info.get_dicts())
    return [dict(d) for d in info]


# OFA-KD's exits on a 12-block ViT/Mixer are blocks 1, 3, 9, 11 (0-based): the same depth fractions on other depths.
TOKEN_EXIT_FRACTIONS = (2 / 12, 4 / 12, 10 / 12, 12 / 12)


def stage_exits(model: nn.Module, n: int = 4) -> list[str]:
    """Module paths of the model's last `n` stages (CNN: last module per reduction; token models with one
    reduction: blocks at OFA-KD's depth fractions). UsageError when the model declares no stages."""
    info = feature_info(model)
    if not info:
        raise UsageError(f"{type(model).__name__} declares no stages (no timm-style feature_info); pass the exit "
                         "module paths explicitly (--exits blocks.1,blocks.3,...)")
    reductions = [d.get("reduction", 0) for d in info]
    if len(set(reductions)) == 1:   # token model: every block at the patch stride
        k = len(info)
        picks = sorted({max(0, min(k - 1, round(f * k) - 1)) for f in TOKEN_EXIT_FRACTIONS[-n:]})
        return [info[i]["module"] for i in picks]
    last_per_reduction: dict[int, str] = {}
    for d in info:
        last_per_reduction[d.get("reduction", 0)] = d["module"]
    mods = [last_per_reduction[r] for r in sorted(last_per_reduction)]
    return mods[-n:]
