"""`--model-def path/file.py:ClassOrFactory`: a user's own nn.Module, imported from a file they name.

The object is called with no arguments. Optional module-level hints in the file: INPUT_SHAPE = (C, H, W),
MEAN, STD, LABELS (list of class names).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from effai.errors import UsageError
from effai.zoo.card import IMAGENET_MEAN, IMAGENET_STD, ModelCard


def load_model_def(spec: str) -> tuple[nn.Module, ModelCard]:
    path_s, sep, obj_name = spec.rpartition(":")
    if not sep or not path_s or not obj_name:
        raise UsageError(f"--model-def '{spec}' must look like path/to/file.py:ClassOrFactory")
    path = Path(path_s)
    if not path.is_file():
        raise UsageError(f"--model-def file not found: {path}")
    mod_name = f"effai_user_{abs(hash(str(path.resolve())))}"
    mspec = importlib.util.spec_from_file_location(mod_name, path)
    if mspec is None or mspec.loader is None:
        raise UsageError(f"--model-def {path} is not an importable Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mod_name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"--model-def {path} failed to import: {type(e).__name__}: {e}") from e
    factory = getattr(module, obj_name, None)
    if factory is None or not callable(factory):
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and getattr(v, "__module__", None) == mod_name and not n.startswith("_"))
        raise UsageError(f"--model-def {path} has no callable '{obj_name}'; it defines: {', '.join(defined) or 'nothing'}")
    try:
        model = factory()
    except TypeError as e:
        raise UsageError(f"--model-def {path}:{obj_name}() must be callable with no arguments: {e}") from e
    except Exception as e:  # the user's own code failed: their bug, reported as such, never an internal error
        raise UsageError(f"--model-def {path}:{obj_name}() raised {type(e).__name__}: {_one_line(e)}; fix the "
                         "factory so that it builds the model with no arguments") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model-def {obj_name}() returned {type(model).__name__}, not a torch.nn.Module")
    shape = _input_shape(getattr(module, "INPUT_SHAPE", (3, 224, 224)), path)
    labels = _labels(getattr(module, "LABELS", None), path)
    mean, std = (_floats(getattr(module, k, None), k, shape[0], path) for k in ("MEAN", "STD"))
    card = ModelCard(
        name=obj_name if inspect.isclass(factory) else obj_name, family="user", source=f"module:{path}:{obj_name}",
        input_size=shape,  # type: ignore[arg-type]
        mean=mean or (IMAGENET_MEAN if shape[0] == 3 else (0.5,) * shape[0]),
        std=std or (IMAGENET_STD if shape[0] == 3 else (0.5,) * shape[0]),
        num_classes=len(labels) if labels else 0, label_set=None,
        description=f"user module {path.name}:{obj_name}",
        extra={"labels": list(labels)} if labels else {},
    )
    return model, card


MAX_SIDE = 4096        # INPUT_SHAPE bounds: a larger input is a typo, not a vision model effai can export
MAX_CHANNELS = 64


def _input_shape(value: object, path: Path) -> tuple[int, int, int]:
    """INPUT_SHAPE as (C, H, W); a leading batch of 1 is accepted. UsageError naming the file otherwise."""
    shape = tuple(value) if isinstance(value, (tuple, list)) else None
    if shape is not None and len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    ok = (shape is not None and len(shape) == 3 and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
          and 1 <= shape[0] <= MAX_CHANNELS and all(1 <= d <= MAX_SIDE for d in shape[1:]))
    if not ok:
        raise UsageError(f"--model-def {path}: INPUT_SHAPE = {str(value)[:60]!s} is not valid; write it as "
                         f"(C, H, W) or (1, C, H, W) with C 1..{MAX_CHANNELS} and H, W 1..{MAX_SIDE}, e.g. "
                         "INPUT_SHAPE = (3, 224, 224) or (1, 3, 224, 224)")
    return shape  # type: ignore[return-value]


def _floats(value: object, name: str, channels: int, path: Path) -> tuple[float, ...] | None:
    """MEAN / STD: one number per channel (or one for all channels); None when the file does not set it."""
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        vals = ()
    if len(vals) not in (1, channels) or (name == "STD" and any(v <= 0 for v in vals)):
        raise UsageError(f"--model-def {path}: {name} = {str(value)[:60]} is not valid; give {channels} numbers, one "
                         f"per input channel{' (all > 0)' if name == 'STD' else ''}, e.g. {name} = "
                         f"{IMAGENET_MEAN if name == 'MEAN' else IMAGENET_STD}")
    return vals


def _labels(value: object, path: Path) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"--model-def {path}: LABELS must be a list of class names (strings), e.g. "
                         "LABELS = ['cat', 'dog']")
    return list(value)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else "(no message)"
