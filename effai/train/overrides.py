"""`--set KEY=VALUE` overrides of a recipe's frozen config, typed by the config dataclass's own field types.

    parse_sets(TrainConfig, ["ofa_eps=1,1,1,1,1.5", "exits=blocks.2,blocks.9", "fold=false"])
    -> {"ofa_eps": (1.0, 1.0, 1.0, 1.0, 1.5), "exits": ("blocks.2", "blocks.9"), "fold": False}
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from effai.errors import UsageError, choices_hint

_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _convert(key: str, text: str, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(inner) < len(args):
            return None
        return _convert(key, text, inner[0])
    if origin is tuple:
        elem = args[0] if args else str
        return tuple(_convert(key, part.strip(), elem) for part in text.split(",") if part.strip())
    try:
        if tp is bool:
            return _BOOLS[text.lower()]
        if tp in (int, float, str):
            return tp(text)
    except (KeyError, ValueError):
        raise UsageError(f"--set {key}={text}: expected a {getattr(tp, '__name__', tp)}") from None
    raise UsageError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def parse_sets(cls: type, pairs: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings -> typed overrides for dataclass `cls`; UsageError naming the valid keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set '{pair}' must look like KEY=VALUE (e.g. --set ofa_temperature=2)")
        if key not in names:
            raise UsageError(f"--set {key}: not an option of this recipe; {choices_hint(key, names)}")
        out[key] = _convert(key, value.strip(), hints[key])
    return out
