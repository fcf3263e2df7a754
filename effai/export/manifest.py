"""manifest.json: the artifact's self-description (schema `effai.manifest/1`), and its verification.

Torch-free so device-side code can read and verify artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effai.errors import EffaiError, UsageError
from effai.files import sha256

SCHEMA = "effai.manifest/1"
MANIFEST = "manifest.json"
PARITY_DATA = "parity.npz"


LOG = "export.log"


def file_entries(root: Path, exclude: tuple[str, ...] = (MANIFEST, LOG)) -> list[dict[str, Any]]:
    """Every file under root (a .mlpackage is a directory: its files are listed one by one), sorted. The manifest
    and the toolchain log are not hashed (the log may still be written to while the manifest is)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256(p)})
    return out


def write(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under root into the manifest and write it atomically; returns the written manifest."""
    manifest = {"schema": SCHEMA, **manifest, "files": file_entries(root)}
    path = root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return manifest


def read(root: Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"artifact directory not found: {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise UsageError(f"{root} is not an effai artifact: it has no {MANIFEST}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); re-export the artifact") from e
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise UsageError(f"{path} has schema {m.get('schema') if isinstance(m, dict) else None!r}; "
                         f"this effai reads {SCHEMA}")
    return m


def check_files(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the files the manifest lists (missing, size or sha256 changed); empty when all match."""
    problems = []
    for f in manifest.get("files", []):
        p = root / f["path"]
        if not p.is_file():
            problems.append(f"{f['path']}: missing")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['path']}: {p.stat().st_size} bytes, manifest says {f['bytes']}")
        elif sha256(p) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 differs from the manifest")
    return problems


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    problems = check_files(root, manifest)
    if problems:
        raise EffaiError(f"artifact {root} failed its hash check: {'; '.join(problems[:5])}; re-export it")
