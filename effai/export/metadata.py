"""Native metadata inside every exported artifact: what the model is and how to feed it, readable on the app side
with each format's own tooling, no effai needed. Runs after lower/parity, before the manifest (`native_metadata`).

`embed` checks, where a runtime exists here, that the outputs on a parity batch are bit-identical before and after
embedding; the bytes written contain no dates. Per format (Core ML, TFLite, ONNX; ExecuTorch: the manifest is the
sidecar): docs/manifest.md, "Native metadata inside the model file".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effai.version import __version__
from effai.errors import EffaiError

TFLITE_METADATA = "TFLITE_METADATA"     # the Metadata entry name TFLite's metadata readers look up
TFLITE_MIN_PARSER = "1.0.0"             # every field written here exists since TFLite Metadata schema 1.0.0
LABELS_FILE = "labels.txt"
INFO_FILE = "effai_metadata.json"       # TFLite: the FIELDS as JSON, a model-level associated file
CLASS_LABEL = "classLabel"              # Core ML classifier outputs: coremltools' ClassifierConfig defaults
CLASS_SCORES = "classLabel_probs"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)        # fixed zip entry times: the same bytes every time


@dataclass(frozen=True)
class ModelInfo:
    """What an artifact says about its model, whatever the format."""

    name: str
    description: str
    author: str                          # "effai <version>"
    license: str                         # the weights' licence
    version: str                         # "weights-sha256:<16 hex>" or "random-init"
    weights_sha256: str                  # or "random-init"
    preprocessing: dict[str, Any]        # the manifest's preprocessing block
    labels: tuple[str, ...]

    def fields(self) -> dict[str, str]:
        """The key/value strings of ONNX metadata_props and Core ML userDefined metadata: the model, its weights,
        every preprocessing parameter (lists as JSON) and the labels (a JSON list)."""
        p = self.preprocessing
        out = {"model": self.name, "description": self.description, "author": self.author, "license": self.license,
               "version": self.version, "weights_sha256": self.weights_sha256,
               "preprocessing": to_json(p)}
        for key in ("input_size", "channels", "channel_order", "layout", "scale", "mean", "std", "interpolation",
                    "crop_pct"):
            if key in p:
                out[key] = p[key] if isinstance(p[key], str) else to_json(p[key])
        if self.labels:
            out["labels"] = to_json(list(self.labels))
        return out

    def input_text(self, shape: tuple[int, ...], dtype: str) -> str:
        """One line an app developer reads in Xcode / Netron / the TFLite metadata: what to feed."""
        p = self.preprocessing
        kind = "RGB" if p.get("channels") == 3 else "greyscale" if p.get("channels") == 1 else "multi-channel"
        return (f"{kind} image, {dtype} {p.get('layout', 'NCHW')} {'x'.join(map(str, shape))}: "
                f"{p.get('recipe', 'see preprocessing')}; mean {p.get('mean')}, std {p.get('std')}")


def describe(card: Any, weights_sha256: str, random_init: bool, preprocessing: dict[str, Any],
             labels: list[str]) -> ModelInfo:
    """ModelInfo from the model card, its weights' hash and the manifest's preprocessing and labels."""
    sha = "random-init" if random_init or not weights_sha256 else weights_sha256
    text = card.description or card.name
    if sha == "random-init":
        text += " (random-init weights: not trained, for testing the pipeline only)"
    return ModelInfo(name=card.name, description=text, author=f"effai {__version__}",
                     license=card.weights_license or "unknown",
                     version="random-init" if sha == "random-init" else f"weights-sha256:{sha[:16]}",
                     weights_sha256=sha, preprocessing=dict(preprocessing), labels=tuple(labels))


def embed(target: Any, root: Path, lowered: Any, info: ModelInfo, probe: np.ndarray | None) -> dict[str, Any]:
    """Write `info` into the artifact at root the target's native way; the manifest's `native_metadata` block.

    probe: one batch of model inputs: where a runtime exists here, the outputs before and after embedding must be
    bit-identical (EffaiError otherwise); None skips that check (--no-verify)."""
    if not target.metadata_modifies_model:
        return {**target.write_metadata(root, lowered, info), "outputs_unchanged": "model file not modified"}
    before = _outputs(target, root, lowered, probe)
    native = target.write_metadata(root, lowered, info)
    if native.get("skipped"):
        native["outputs_unchanged"] = "model file not modified"
    elif probe is None:
        native["outputs_unchanged"] = "not checked (--no-verify)"
    elif isinstance(before, str):
        native["outputs_unchanged"] = f"not checked ({before})"
    else:
        try:
            after = _outputs(target, root, lowered, probe)
        except Exception as e:   # e.g. a runtime refusing what was added (Core ML on macOS: the classifier)
            raise EffaiError(f"the {target.name} artifact no longer runs after embedding its metadata "
                             f"({type(e).__name__}: {str(e).strip()[:200]}): an effai bug; please report it") from e
        assert not isinstance(after, str)
        if len(after) != len(before) or any(a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes()
                                            for a, b in zip(after, before)):
            raise EffaiError(f"embedding {target.name} metadata changed the model's outputs: an effai bug; please "
                             "report it (the export log is kept in the temp directory)")
        native["outputs_unchanged"] = True
    return native


def summary(native: dict[str, Any]) -> str:
    """The stage's one-line detail."""
    if native.get("skipped"):
        return f"skipped: {native['skipped']}"
    if native["format"] == "sidecar":
        return f"none in the model file: {native['sidecar']} is the sidecar"
    s = f"{len(native['fields'])} fields, labels {native['labels']}"
    if native.get("classifier"):
        s += f", classifier ({native['classifier']['classes']} classes)"
    if native.get("outputs_unchanged") is True:
        s += ", outputs bit-identical"
    return s


def _outputs(target: Any, root: Path, lowered: Any, probe: np.ndarray | None) -> list[np.ndarray] | str | None:
    if probe is None:
        return None
    predictor = target.load(root, lowered)
    if isinstance(predictor, str):
        return predictor
    return [np.array(o, copy=True) for o in predictor.run([np.ascontiguousarray(probe)])]


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def output_text(info: ModelInfo, n_outputs: int) -> str:
    if n_outputs == 1 and info.labels:
        return (f"raw class scores (logits, no softmax) for {len(info.labels)} classes, in the order of the "
                f"labels; apply softmax for probabilities")
    return "model output"
