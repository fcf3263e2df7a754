"""manifest.json: the artifact's self-description (schema `effai.manifest/1`), and its verification.

Torch-free so device-side code can read and verify artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effai.errors import EffaiError, UsageError
from effai import files
from effai.files import check_entries, inside, read_json

SCHEMA = "effai.manifest/1"
MANIFEST = "manifest.json"
PARITY_DATA = "parity.npz"


LOG = "export.log"


def file_entries(root: Path, exclude: tuple[str, ...] = (MANIFEST, LOG)) -> list[dict[str, Any]]:
    """Every file under root (a .mlpackage is a directory: its files are listed one by one), sorted. The manifest
    and the toolchain log are not hashed (the log may still be written to while the manifest is)."""
    return files.file_entries(root, exclude)


def build(*, model: dict[str, Any], target: str, precision: str, status: str, quantization: dict[str, Any] | None,
          warnings: list[str], runtime_settings: dict[str, Any], lowered: Any, preprocessing: dict[str, Any],
          labels: list[str], native_metadata: dict[str, Any], fold: dict[str, Any], parity: dict[str, Any],
          accuracy: dict[str, Any] | None, toolchain: dict[str, str], export_config: dict[str, Any],
          timings: dict[str, float]) -> dict[str, Any]:
    """The manifest of one artifact (schema effai.manifest/1, fields in docs/manifest.md); `write` adds the files."""
    from datetime import datetime, timezone

    from effai.version import __version__

    return {
        "effai_version": __version__, "model": model, "target": target, "precision": precision, "status": status,
        "quantization": quantization, "warnings": warnings, "runtime_settings": runtime_settings,
        "model_file": lowered.model_file, "inputs": [s.to_dict() for s in lowered.inputs],
        "outputs": [s.to_dict() for s in lowered.outputs], "preprocessing": preprocessing, "labels": labels,
        "native_metadata": native_metadata, "fold": fold, "parity": parity, "accuracy": accuracy,
        "target_details": lowered.details, "toolchain": toolchain, "export_config": export_config,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "timings_s": timings,
    }


def write(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under root into the manifest and write it atomically; returns the written manifest."""
    manifest = {"schema": SCHEMA, **manifest, "files": file_entries(root)}
    path = root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return manifest


def read(root: Path) -> dict[str, Any]:
    """The parsed manifest of an artifact dir; UsageError for a missing, malformed, hostile or foreign one."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"artifact directory not found: {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise UsageError(f"{root} is not an effai artifact: it has no {MANIFEST}")
    m = read_json(path, str(path))
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise UsageError(f"{path} has schema {str(m.get('schema'))[:60] if isinstance(m, dict) else None!r}; "
                         f"this effai reads {SCHEMA}; re-export the artifact")
    return m


def model_file(root: Path, manifest: dict[str, Any]) -> Path:
    """The model file the manifest names, checked to lie inside root and to be hashed by the manifest (a file, or
    a .mlpackage directory whose files are all listed). UsageError otherwise."""
    name = manifest.get("model_file")
    p = inside(root, name)
    if p is None:
        raise UsageError(f"{root / MANIFEST}: model_file {str(name)[:80]!r} is not a path inside the artifact "
                         "directory (absolute, '..' or a symlink leading out); refusing it: re-export the artifact")
    listed = {f.get("path") for f in _entries(manifest)}
    under = [x for x in listed if isinstance(x, str) and x.startswith(f"{name}/")]
    if name not in listed and not under:
        raise UsageError(f"{root / MANIFEST}: model_file {name} is not among the files the manifest hashes, so it "
                         "cannot be checked; refusing it: re-export the artifact")
    return p


def _entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    files = manifest.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise UsageError("the manifest's files is not a list of {path, bytes, sha256} objects; re-export the artifact")
    return files


def check_files(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the files the manifest lists and files the directory holds that it does not list, one line
    each (effai.files.check_entries); empty when all match."""
    return check_entries(root, _entries(manifest), "the manifest", (MANIFEST, LOG))


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    problems = check_files(root, manifest)
    if problems:
        raise EffaiError(f"artifact {root} failed its hash check: {'; '.join(problems[:5])}; re-export it")
