"""Precisions an artifact can be exported at (`effai export --quantize Q`): one name means one thing on every target.

Each target lists the subset its backend implements (Target.precisions); `resolve()` rejects the others up front.
Static int8 (Jacob et al., CVPR 2018): q = clamp(round(x / s) + z, -128, 127), x ~ s (q - z); weights symmetric per
output channel (z = 0), activations asymmetric per tensor. Table: docs/quantization.md, "effai/export/precisions.py".
"""

from __future__ import annotations

from dataclasses import dataclass

from effai.registry import Registry


@dataclass(frozen=True)
class Precision:
    name: str
    description: str
    weight_bits: int                 # bits per stored weight (size model: fp32 = 32)
    quantized: bool                  # anything below the float precisions
    needs_calibration: bool = False  # static activation ranges from --calib data


PRECISIONS: Registry[Precision] = Registry("precision")
for _p in (
    Precision("fp32", "float32 weights and compute", 32, False),
    Precision("fp16", "float16 weights (and compute where the runtime has it)", 16, False),
    Precision("int8", "static int8: per-channel int8 weights, 8-bit activations (int8, or uint8 where the backend "
              "is faster with it) calibrated on --calib data", 8, True,
              needs_calibration=True),
    Precision("int8-dynamic", "dynamic-range int8: int8 weights, activations quantized per run", 8, True),
    Precision("int8-weight", "weight-only int8: int8 weights dequantized to float compute", 8, True),
    Precision("int4-weight", "weight-only int4: 4-bit weights dequantized to float compute", 4, True),
    Precision("palette4", "4-bit palettization: 16-entry k-means lookup table per weight tensor", 4, True),
    Precision("palette6", "6-bit palettization: 64-entry k-means lookup table per weight tensor", 6, True),
    Precision("palette8", "8-bit palettization: 256-entry k-means lookup table per weight tensor", 8, True),
):
    PRECISIONS.register(_p.name, _p)


def help_text(targets: dict[str, tuple[str, ...]]) -> str:
    """'Q per target' line for --help."""
    return "; ".join(f"{t}: {'|'.join(ps)}" for t, ps in targets.items())
