"""bundle.json: the index of an app-ready bundle, every file with its size and sha256 (schema `effai.bundle/1`).

A bundle is one directory per model (ARCHITECTURE.md: the app-facing unit):

    <out>/<model>/
      bundle.json          this index (signed as exact bytes: bundle.sig holds the Ed25519 signature)
      bundle.sig           optional; base64 Ed25519 signature of bundle.json's bytes (effai zoo pack --sign KEY)
      MODEL_CARD.md        generated: what it is, accuracy per artifact, perf table (from perf.json)
      labels.txt           one class name per line
      preprocessing.json   how to feed it (size, layout, mean/std, interpolation, ...), the card's recipe
      perf.json            optional; measured results appended by `effai bench --record BUNDLE`
      <target>-<precision>/  one effai export artifact dir each (manifest.json + model file + parity.npz)

Every file below the bundle root except bundle.json and bundle.sig is listed in `files` (posix relative paths,
sorted), so a flipped byte anywhere is found by `check()`. torch-free: verifying or installing a bundle needs
only the standard library (and `cryptography` for signatures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effai.errors import UsageError
from effai.files import atomic_write, sha256

SCHEMA = "effai.bundle/1"
SCHEMA_VERSION = 1
INDEX = "bundle.json"
SIGNATURE = "bundle.sig"
UNLISTED = (INDEX, SIGNATURE)


def file_entries(root: Path) -> list[dict[str, Any]]:
    """[{path, bytes, sha256}] of every file below root except bundle.json/bundle.sig, sorted by path."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in UNLISTED:
            out.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256(p)})
    return out


def write(root: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Re-list the files and write bundle.json (deterministic bytes: sorted keys, fixed indent, trailing newline).
    Returns the index written. Any existing signature no longer matches: the caller re-signs or removes it."""
    root = Path(root)
    index = {**index, "schema": SCHEMA, "files": file_entries(root)}
    atomic_write(root / INDEX, dumps(index))
    return index


def dumps(index: dict[str, Any]) -> str:
    return json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def read(root: Path) -> dict[str, Any]:
    """bundle.json of a bundle directory; UsageError for a missing/garbage index or one from a newer effai."""
    root = Path(root)
    path = root / INDEX
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory; pass a bundle directory written by `effai zoo pack` "
                         "(or a .zip / .tar.gz of one)")
    if not path.is_file():
        raise UsageError(f"{root} has no {INDEX}: not an effai bundle; pack one with `effai zoo pack MODEL`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); re-pack the bundle") from None
    schema = str(index.get("schema", "")) if isinstance(index, dict) else ""
    if not schema.startswith("effai.bundle/"):
        raise UsageError(f"{path} is not an effai bundle index (schema {schema!r}); re-pack the bundle")
    try:
        version = int(schema.split("/", 1)[1])
    except ValueError:
        raise UsageError(f"{path}: unreadable schema {schema!r}; re-pack the bundle") from None
    if version > SCHEMA_VERSION:
        raise UsageError(f"{path} was written by a newer effai ({schema}; this effai reads {SCHEMA}); upgrade "
                         "effai: pip install -U effai")
    files = index.get("files", [])
    if not isinstance(files, list) or not isinstance(index.get("model", {}), dict) or not isinstance(
            index.get("artifacts", []), list):
        raise UsageError(f"{path}: 'files', 'artifacts' or 'model' has the wrong type; bundle.json is damaged or "
                         "was edited: re-pack the bundle")
    for n, f in enumerate(files):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("bytes"), int)
                and isinstance(f.get("sha256"), str)):
            raise UsageError(f"{path}: files[{n}] is not {{path, bytes, sha256}}; bundle.json is damaged or was "
                             "edited: re-pack the bundle")
        if not safe_relpath(f["path"]):
            raise UsageError(f"{path} lists an unsafe path {f['path']!r} (absolute or with '..'): refusing "
                             "the bundle; re-pack it")
    return index


def safe_relpath(rel: str) -> bool:
    """A posix path relative to the bundle root that stays inside it: not empty, not absolute, no '..', no '\\'."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and ".." not in parts and "" not in parts


def check(root: Path, index: dict[str, Any] | None = None) -> list[str]:
    """Every difference between the bundle on disk and its index, one line each ([] when intact): a changed file
    (size or sha256), a listed file that is missing, a file that is not listed."""
    root = Path(root)
    index = read(root) if index is None else index
    listed = {f["path"]: f for f in index.get("files", [])}
    problems = []
    on_disk = {e["path"]: e for e in file_entries(root)}
    for rel, want in sorted(listed.items()):
        got = on_disk.get(rel)
        if got is None:
            problems.append(f"missing: {rel}")
        elif got["bytes"] != want["bytes"] or got["sha256"] != want["sha256"]:
            problems.append(f"changed: {rel} (sha256 {got['sha256'][:12]}..., index says {want['sha256'][:12]}...)")
    for rel in sorted(set(on_disk) - set(listed)):
        problems.append(f"not in the index: {rel}")
    return problems
