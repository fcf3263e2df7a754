"""Export targets, one module each; importing this package registers them (their toolchains load lazily)."""

from effai.export.targets import coreml, executorch, onnx, tflite  # noqa: F401  (registration)
from effai.export.targets.base import TARGETS, Lowered, LowerOptions, Predictor, Target, TensorSpec

__all__ = ["TARGETS", "Lowered", "LowerOptions", "Predictor", "Target", "TensorSpec"]
