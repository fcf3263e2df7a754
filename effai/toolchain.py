"""Versions of everything that shapes an artifact (recorded in manifests, shown by `effai doctor`)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from effai.version import __version__

PACKAGES = ("torch", "torchvision", "timm", "numpy", "executorch", "coremltools", "litert-torch", "ai-edge-litert",
            "ai-edge-quantizer", "onnx", "onnxscript", "onnxruntime", "onnxslim")


def versions() -> dict[str, str]:
    out = {"effai": __version__, "python": platform.python_version(),
           "platform": f"{platform.system()}-{platform.machine()}"}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out
