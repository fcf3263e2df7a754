"""Find a torch layer inside a converted model by the content of its weight.

Converters rename everything (ONNX `node_conv2d_12`, TFLite `tfl.conv_2d;...`, Core ML `input_37`), but they keep
each layer's weight values; only the layout changes (OIHW -> OHWI, depthwise 1HWO, transposed Linear). Sorted
values are invariant under any permutation of the axes, so `sorted(w.ravel())` fingerprints a layer in every format.
Used to keep chosen layers in float when quantizing (`LowerOptions.float_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from effai.errors import EffaiError


def layer_weights(model: Any, names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """{module name: its weight as float32 numpy} for the named modules of a torch model (nn.Module or
    ExportedProgram, whose state_dict holds the same names)."""
    state = model.state_dict() if callable(getattr(model, "state_dict", None)) else model.state_dict
    out = {}
    for n in names:
        key = f"{n}.weight"
        if key not in state:
            raise EffaiError(f"layer '{n}' has no weight in the model to keep in float")
        out[n] = state[key].detach().float().cpu().numpy()
    return out


def fingerprint(w: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(w, np.float32).ravel())


def match(wanted: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray], rtol: float = 1e-3,
          atol: float = 1e-6) -> dict[str, list[str]]:
    """{wanted name: [candidate keys whose values equal it up to layout]}; candidates are the converted model's
    weight tensors (float32 or float16 numpy, any layout). A wanted layer may match several candidates (shared
    weights) or none (the converter folded it away): callers report the misses."""
    by_size: dict[int, list[tuple[str, np.ndarray]]] = {}
    for k, v in candidates.items():
        by_size.setdefault(int(np.asarray(v).size), []).append((k, fingerprint(v)))
    out: dict[str, list[str]] = {}
    for name, w in wanted.items():
        fp = fingerprint(w)
        out[name] = [k for k, c in by_size.get(fp.size, []) if np.allclose(c, fp, rtol=rtol, atol=atol)]
    return out
