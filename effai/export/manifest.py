"""manifest.json: the artifact's self-description (schema `effai.manifest/1`), and its verification.

Torch-free so device-side code can read and verify artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from effai.errors import EffaiError, UsageError
from effai import files
from effai.files import read_json, sha256

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


def inside(root: Path, rel: object) -> Path | None:
    """root/rel when `rel` is a relative path that stays inside root (no absolute path, no '..', no symlink
    leading out); None otherwise. Manifests are untrusted: every path they name goes through here."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
        return None
    p = root / pure
    try:
        real_root = root.resolve(strict=True)
        real = p.resolve()
    except (OSError, RuntimeError):   # a symlink loop
        return None
    if real != real_root and real_root not in real.parents:
        return None
    return p


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
    """Problems with the files the manifest lists (outside the directory, missing, size or sha256 changed) and
    with files the directory holds that it does not list; empty when all match."""
    root = Path(root)
    problems = []
    listed = set()
    for f in _entries(manifest):
        rel = f.get("path")
        p = inside(root, rel)
        if p is None:
            problems.append(f"{str(rel)[:80]}: not a path inside the artifact directory (absolute, '..' or a symlink "
                            "leading out); refused")
            continue
        listed.add(PurePosixPath(rel).as_posix())
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: missing" if not p.exists() else f"{rel}: not a regular file")
        elif p.stat().st_size != f.get("bytes"):
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {f.get('bytes')}")
        elif sha256(p) != f.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    for extra in unlisted(root, listed):
        problems.append(f"{extra}: present in the directory but not listed in the manifest")
    return problems


def unlisted(root: Path, listed: set[str], exclude: tuple[str, ...] = (MANIFEST, LOG)) -> list[str]:
    """Files (and symlinks) under root that the manifest does not list, apart from the manifest and the log."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_symlink() or not p.is_dir()) and rel not in listed and rel not in exclude:
            out.append(rel)
    return out


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    problems = check_files(root, manifest)
    if problems:
        raise EffaiError(f"artifact {root} failed its hash check: {'; '.join(problems[:5])}; re-export it")
