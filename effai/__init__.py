"""effai: train, fold, quantize and export compact vision models to phones and edge boards.

    import effai
    result = effai.export("ghostnetv3_050.digits", target="tflite")      # or an nn.Module, or a checkpoint path
    effai.load_artifact(result.out_dir).predict(["cat.jpg"])

The public API (effai/api.py, docs/api.md) is imported on first use, so `import effai` stays light (no torch).
"""

import sys
import types
from typing import Any

from effai.version import __version__

__all__ = ["__version__", "Artifact", "ExportResult", "ParityFailed", "EffaiError", "UsageError", "bench", "export",
           "list_models", "load_artifact", "verify"]

_API = {"Artifact", "bench", "export", "list_models", "load_artifact", "verify"}


def __getattr__(name: str) -> Any:       # PEP 562: the API and its torch imports load when first used
    if name in _API:
        from effai import api

        return getattr(api, name)
    if name in ("ExportResult", "ParityFailed"):
        from effai.export import pipeline

        return getattr(pipeline, name)
    if name in ("EffaiError", "UsageError"):
        from effai import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'effai' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`effai.export` is the API function, though effai/export/ is also a subpackage: importing the subpackage must
    not replace the function on this module (the import system sets the parent's attribute; sys.modules keeps the
    subpackage for every `from effai.export... import`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return              # left unset, so module __getattr__ answers with the API function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(__all__)
