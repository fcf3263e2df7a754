"""An effai artifact directory as bench sees it: the manifest, the model file, and a hash check before timing.

Bench reads only files on disk (no torch, no effai.export), so a corrupted or hand-edited artifact is caught here,
with the file named, before any runner copies it to a device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effai.errors import UsageError
from effai.export import manifest as manifest_io   # torch-free, like this module
from effai.files import MAX_JSON_BYTES, loads_json, read_json

MANIFEST = "manifest.json"
TARGETS = ("executorch", "tflite", "onnx", "coreml")


@dataclass(frozen=True)
class Artifact:
    """One exported artifact: its directory, parsed manifest and model file (a file, or a .mlpackage directory)."""

    dir: Path
    manifest: dict[str, Any] = field(repr=False, compare=False)
    model_file: Path
    target: str
    precision: str
    model_name: str
    manifest_sha256: str = ""

    def describe(self) -> dict[str, Any]:
        """What a BenchRecord stores about the artifact (and what baselines match on: model, target, precision)."""
        return {"path": str(self.dir), "model": self.model_name, "target": self.target, "precision": self.precision,
                "model_file": self.manifest.get("model_file"), "manifest_sha256": self.manifest_sha256,
                "bytes": model_bytes(self.manifest), "inputs": self.manifest.get("inputs", [])}


def model_bytes(manifest: dict[str, Any]) -> int:
    """Size of the model file (all files under a .mlpackage) as the manifest lists it."""
    mf = str(manifest.get("model_file", ""))
    return sum(int(f.get("bytes", 0)) for f in manifest.get("files", [])
               if f.get("path") == mf or str(f.get("path", "")).startswith(mf + "/"))


def file_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Listed files outside the directory, missing, or with a changed size or sha256, and files the directory
    holds that the manifest does not list; empty when all match (effai.export.manifest.check_files)."""
    return manifest_io.check_files(root, manifest)


def load(path: Path | str, check_hashes: bool = True) -> Artifact:
    """Read and check an artifact directory; UsageError naming the problem and the fix for anything wrong."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"artifact directory not found: {root}; pass a directory written by effai export")
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory; pass an artifact directory written by effai export")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UsageError(f"{root} has no {MANIFEST}, so it is not an effai artifact; export one with: effai export "
                         "MODEL --target T --out DIR")
    try:
        raw = mpath.read_bytes() if mpath.stat().st_size <= MAX_JSON_BYTES else b""
    except OSError as e:
        raise UsageError(f"cannot read {mpath}: {e.strerror or e}") from None
    manifest = loads_json(raw, str(mpath)) if raw else read_json(mpath)   # read_json names the size limit
    if not isinstance(manifest, dict):
        raise UsageError(f"{mpath} is not a JSON object; re-export the artifact")
    missing = [k for k in ("target", "model_file", "inputs") if k not in manifest]
    if missing:
        raise UsageError(f"{mpath} lacks {', '.join(missing)}; re-export the artifact")
    if manifest["target"] not in TARGETS:
        raise UsageError(f"{mpath}: unknown target '{str(manifest['target'])[:40]}' (bench runs "
                         f"{', '.join(TARGETS)}); re-export the artifact")
    model_file = manifest_io.model_file(root, manifest)   # inside the directory and hashed, or refused
    if not model_file.exists():
        raise UsageError(f"{root}: the model file {manifest['model_file']} named by the manifest is missing; "
                         "re-export the artifact")
    if check_hashes:
        problems = file_problems(root, manifest)
        if problems:
            raise UsageError(f"artifact {root} failed its hash check: {'; '.join(problems[:3])}"
                             f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; re-export it, "
                             f"or see what changed with: effai verify {root}")
    model = manifest.get("model") or {}
    return Artifact(dir=root.resolve(), manifest=manifest, model_file=model_file.resolve(),
                    target=str(manifest["target"]), precision=str(manifest.get("precision", "unknown")),
                    model_name=str(model.get("name", root.name)) if isinstance(model, dict) else str(model),
                    manifest_sha256=hashlib.sha256(raw).hexdigest())
