"""One model of the matrix: the unfolded torch model, its fixed input and reference, shared by all targets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from effai import zoo


class NotApplicable(Exception):
    """The upstream toolchain has no plain flow for this precision (recorded as n/a, not as a failure)."""


class Case:
    """One model: the unfolded torch model, its fixed input and reference output, data shared by all targets."""

    def __init__(self, name: str, work: Path, calib_samples: int, log: Path) -> None:
        self.name, self.work, self.calib_samples, self.log = name, work, calib_samples, log
        if name.endswith(".safetensors"):          # a trained checkpoint: named after its card and run dir
            self.loaded = zoo.create(weights=Path(name))
            self.name = f"{self.loaded.card.source.split(':')[-1]}.{Path(name).parent.name}"
        else:
            self.loaded = zoo.create(name)
        self.model = self.loaded.model.eval()
        self.card = self.loaded.card
        self.eval = self._eval_set()
        self.x = self._fixed_input()
        with torch.no_grad():
            self.reference = _first(self.model(torch.from_numpy(self.x))).numpy()
        self.cache: dict[str, tuple[Path, float]] = {}   # upstream float conversions: key -> (file, seconds)
        self._calib: np.ndarray | None = None

    def _eval_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        spec = self.card.extra.get("eval_data")
        if not spec:
            return None
        from effai.export.evaluate import eval_set

        x, labels, _ = eval_set(spec, self.card)
        return x, labels

    def _fixed_input(self) -> np.ndarray:
        """The first held-out image when the card has labelled data, else the first parity photo."""
        if self.eval is not None:
            return np.ascontiguousarray(self.eval[0][:1])
        from effai.data.photos import parity_inputs

        x, _, _ = parity_inputs(self.card.preprocessing(), 1, 0, 0)
        return np.ascontiguousarray(x[:1], np.float32)

    @property
    def calib(self) -> np.ndarray:
        """The calibration samples effai's export uses (same source, count and seed)."""
        if self._calib is None:
            from effai.export import calibration

            self._calib = calibration.load("auto", self.card.preprocessing(), self.card, self.calib_samples).x
        return self._calib

    def float_artifact(self, key: str, build: Callable[[Path], None], path: Path) -> tuple[Path, float]:
        """Build an upstream float artifact once per model; (path, seconds it took)."""
        if key not in self.cache:
            t0 = time.perf_counter()
            build(path)
            self.cache[key] = (path, time.perf_counter() - t0)
        return self.cache[key]


def _first(out: Any) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out



def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _mb(p: Path) -> float:
    """Size of a model file with its external data (ONNX model.onnx.data), or of a package directory."""
    if p.is_dir():
        return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 3)
    files = [f for f in p.parent.iterdir() if f.name == p.name or f.name.startswith(p.name + ".")]
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


def _delegation_short(d: dict[str, Any]) -> dict[str, Any]:
    return {"partitions": d["partitions"], "non_delegated_ops": d["non_delegated_ops"]}

