"""The Target protocol: one implementation per export format, registered by name, toolchains imported lazily."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from effai.registry import Registry


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "NCHW"
    quantization: tuple[float, int] | None = None   # (scale, zero_point) of an integer tensor: x = scale * (q - zp)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.quantization is None:
            d.pop("quantization")
        else:
            d["quantization"] = {"scale": self.quantization[0], "zero_point": self.quantization[1]}
        return d


@dataclass(frozen=True)
class LowerOptions:
    """What every target's lower() receives besides the model."""

    precision: str = "fp32"           # a name from effai.export.precisions.PRECISIONS the target lists
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)
    calibration: Any = None           # np.ndarray N,C,H,W float32, preprocessed per the card (precisions needing it)
    float_layers: tuple[str, ...] = ()  # torch module names (Conv/Linear) to keep in float: the sensitivity fallback
    io_dtype: str = "float"           # TFLite int8 only: "int8" makes input/output tensors int8 (scale/zero-point)


LAYER_KINDS = ("conv", "depthwise", "linear")


@dataclass(frozen=True)
class LayerRule:
    """Which Conv/Linear layers a backend really quantizes at one precision: the layer kinds its quantizer handles
    and the smallest weight (elements) it touches. The sensitivity fallback ranks only these layers, since keeping a
    layer in float that the backend leaves in float anyway changes nothing."""

    kinds: frozenset[str] = frozenset(LAYER_KINDS)
    min_weights: int = 0

    def covers(self, kind: str, weights: int) -> bool:
        return kind in self.kinds and weights >= self.min_weights


ALL_LAYERS = LayerRule()


@dataclass
class Lowered:
    """What lower() wrote into the artifact directory."""

    model_file: str                   # relative path of the file an app loads (model.pte, model.mlpackage, ...)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    details: dict[str, Any] = field(default_factory=dict)   # target-specific: delegation summary, opset, ops ...


@dataclass
class Predictor:
    """A loaded artifact in its real host runtime: numpy arrays in, numpy arrays out."""

    runtime: str                      # "executorch-xnnpack", "onnxruntime", ...
    version: str
    run: Callable[[list[np.ndarray]], list[np.ndarray]]


class Target(Protocol):
    name: str
    description: str
    precisions: tuple[str, ...]       # first one is the default
    needs_exported_program: bool      # lower() takes a torch.export ExportedProgram (else the nn.Module)
    unsupported: dict[str, str]       # precision -> why this target does not offer it (shown when it is refused)
    quantizes: dict[str, LayerRule]   # precision -> the layers its quantizer touches (absent: every Conv/Linear)

    def available(self) -> tuple[bool, str]:
        """(True, versions) or (False, what is missing and how to install it). Never raises."""

    def lower(self, model: Any, example_inputs: tuple, options: LowerOptions, out_dir: Path) -> Lowered: ...

    def load(self, out_dir: Path, lowered: Lowered) -> Predictor | str:
        """The host runtime for parity, or a string saying why none can run here."""

    def structural_check(self, out_dir: Path, lowered: Lowered, expected: dict[str, Any]) -> dict[str, Any] | None:
        """A check that does not need a runtime (Core ML on Linux); None where not applicable."""

    metadata_modifies_model: bool     # False: the description is a sidecar, the model file is not touched

    def write_metadata(self, root: Path, lowered: Lowered, info: Any) -> dict[str, Any]:
        """The model's description (effai.export.metadata.ModelInfo) written this format's native way; returns the
        manifest's `native_metadata` block."""


TARGETS: Registry[Target] = Registry("target")


def layout_for(shape: tuple[int, ...]) -> str:
    """Layout label of an output by rank: class scores NC, feature maps NCHW."""
    return {2: "NC", 3: "NLC", 4: "NCHW"}.get(len(shape), "")


def package_versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "not installed"
    return out


def require(*modules_and_dists: tuple[str, str], extra: str) -> tuple[bool, str]:
    """(ok, message) for targets: are these modules importable? Never raises."""
    import importlib.util

    missing = [dist for mod, dist in modules_and_dists if importlib.util.find_spec(mod) is None]
    if missing:
        return False, f"missing {', '.join(missing)}; install with: pip install 'effai[{extra}]'"
    versions = package_versions(*(d for _, d in modules_and_dists))
    return True, ", ".join(f"{k} {v}" for k, v in versions.items())
