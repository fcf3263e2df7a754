"""Loading user checkpoints safely: safetensors, or torch files read with weights_only=True (never unpickled).

Handles the usual wrappers ({"state_dict": ...}, {"model": ...}, EMA copies) and prefixes ("module." from DDP,
"_orig_mod." from torch.compile). A checkpoint that does not fit the architecture is refused with the names of
the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effai.errors import UsageError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema", "ema")
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; `sha256` is 'random-init' when there are none."""

    source: str      # path, "timm-hub:<name>", "bundled:<file>" or "random-init"
    sha256: str
    bytes: int = 0


RANDOM_INIT = WeightsInfo(source="random-init", sha256="random-init")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} from a .safetensors or torch checkpoint, refusing anything but tensors."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"weights {path} is a directory, not a checkpoint file; pass the .safetensors or .pt/.pth "
                         "file in it (a finished effai train run writes <run>/model.safetensors)")
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}; pass an existing .safetensors or .pt/.pth file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"{path} is not a readable safetensors file (corrupt or truncated?): {_first_line(e)}") from e
    try:
        with warnings.catch_warnings():   # torch warns about pickle protocols on stderr; the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and ("Unsupported operand" not in str(e) or _pickle_calls(path)):
            raise UsageError(f"refusing to unpickle {path}: it holds more than tensors and plain containers, and "
                             f"unpickling it could run code ({_refusal_reason(e)}); re-save it as safetensors or as "
                             "a plain state_dict where it came from") from None
        raise UsageError(f"{path} is not a readable torch checkpoint (corrupt, truncated, or not a checkpoint): "
                         f"{_first_line(e)}") from None
    except Exception as e:  # torch raises KeyError, RuntimeError, EOFError, ... on garbage: all mean the same
        raise UsageError(f"{path} is not a readable torch checkpoint (corrupt, truncated, or not a checkpoint): "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    return _unwrap(obj, path)


def _pickle_calls(path: Path) -> bool:
    """Whether the file starts with a well-formed pickle that imports or calls something (GLOBAL, REDUCE, ...): read
    with pickletools, which parses opcodes and runs nothing. Random bytes are not (torch says "Unsupported operand"
    for both)."""
    import pickletools

    calls = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
    try:
        with open(path, "rb") as f:
            ops = [op.name for op, _, _ in pickletools.genops(f.read(1 << 20))]   # the whole pickle, to its STOP
    except Exception:   # not a well-formed pickle: garbage
        return False
    return ops[-1:] == ["STOP"] and any(name in calls for name in ops)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"checkpoint": {"state_dict": {...}}} at most a few levels deep
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _strip_prefixes(dict(obj))
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    kind = type(obj).__name__
    keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else ""
    raise UsageError(f"{path} holds no state_dict (found a {kind}{' with keys ' + keys if keys else ''}); "
                     f"save model.state_dict() or wrap it as {{'state_dict': ...}}")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str, path: Path | str) -> None:
    """Strictly load `sd` into `model`; on mismatch name the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, checkpoint vs model ({_few(shapes)})")
        raise UsageError(f"checkpoint {path} does not fit {what}: {'; '.join(parts)}; "
                         "pick the model the checkpoint was trained as (effai zoo list)")
    model.load_state_dict(sd, strict=True)


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... +{len(items) - n}" if len(items) > n else "")


def _refusal_reason(e: BaseException) -> str:
    """The line of torch's weights-only refusal that names what it met ("unsupported GLOBAL posix.system ...")."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    for line in str(e).splitlines():
        line = line.strip().rstrip(".")
        if line and not line.startswith(boiler) and "weights_only" not in line:
            return line[:160]
    return "an object the safe loader does not accept"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
