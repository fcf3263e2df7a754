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
        raise UsageError(f"--model-def {obj_name}() must be callable with no arguments: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model-def {obj_name}() returned {type(model).__name__}, not a torch.nn.Module")
    shape = tuple(getattr(module, "INPUT_SHAPE", (3, 224, 224)))
    labels = getattr(module, "LABELS", None)
    card = ModelCard(
        name=obj_name if inspect.isclass(factory) else obj_name, family="user", source=f"module:{path}:{obj_name}",
        input_size=shape,  # type: ignore[arg-type]
        mean=tuple(getattr(module, "MEAN", IMAGENET_MEAN if shape[0] == 3 else (0.5,) * shape[0])),
        std=tuple(getattr(module, "STD", IMAGENET_STD if shape[0] == 3 else (0.5,) * shape[0])),
        num_classes=len(labels) if labels else 0, label_set=None,
        description=f"user module {path.name}:{obj_name}",
        extra={"labels": list(labels)} if labels else {},
    )
    return model, card
