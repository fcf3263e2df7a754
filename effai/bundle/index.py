"""bundle.json: the index of an app-ready bundle, every file with its size and sha256 (schema `effai.bundle/1`).

Every file below the bundle root except bundle.json and bundle.sig is listed in `files` (posix relative paths,
sorted), so a flipped byte anywhere is found by `check()`. torch-free: verifying or installing a bundle needs
only the standard library (and `cryptography` for signatures). Layout and fields: docs/bundle.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from effai.errors import UsageError
from effai import files
from effai.files import atomic_write, read_json

SCHEMA = "effai.bundle/1"
SCHEMA_VERSION = 1
INDEX = "bundle.json"
SIGNATURE = "bundle.sig"
UNLISTED = (INDEX, SIGNATURE)
ARTIFACT_STATUSES = ("pass", "fail", "unverified", "export-failed")
# Names a model file may not have: the other files of an artifact dir and of the bundle / an install.
RESERVED = frozenset({INDEX, SIGNATURE, "manifest.json", "parity.npz", "export.log", "labels.txt",
                      "preprocessing.json", "MODEL_CARD.md", "perf.json", ".effai-install.json"})
_MODEL_NAME = re.compile(r"model\.[A-Za-z0-9]+")   # model.pte | model.tflite | model.onnx | model.mlpackage


def file_entries(root: Path) -> list[dict[str, Any]]:
    """[{path, bytes, sha256}] of every file below root except bundle.json/bundle.sig, sorted by path."""
    return files.file_entries(root, UNLISTED)


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
        raise UsageError(f"{root} is not a directory; pass a bundle directory written by `effai bundle pack` "
                         "(or a .zip / .tar.gz of one)")
    if not path.is_file():
        raise UsageError(f"{root} has no {INDEX}: not an effai bundle; pack one with `effai bundle pack MODEL`")
    index = read_json(path, str(path))
    schema = index.get("schema", "") if isinstance(index, dict) else ""
    schema = schema if isinstance(schema, str) else ""
    if not schema.startswith("effai.bundle/"):
        raise UsageError(f"{path} is not an effai bundle index (schema {schema[:80]!r}); re-pack the bundle")
    try:
        version = int(schema.split("/", 1)[1])
    except ValueError:
        raise UsageError(f"{path}: unreadable schema {schema[:80]!r}; re-pack the bundle") from None
    if version > SCHEMA_VERSION:
        raise UsageError(f"{path} was written by a newer effai ({schema[:80]}; this effai reads {SCHEMA}); upgrade "
                         "effai: pip install -U effai")
    assert isinstance(index, dict)
    validate(index, path)
    return index


def _bad(path: Path, what: str) -> UsageError:
    return UsageError(f"{path}: {what}; bundle.json is damaged or was edited: re-pack the bundle")


def validate(index: dict[str, Any], path: Path) -> None:
    """The shape every reader relies on (files, model, artifacts, skipped, deterministic); UsageError (one line,
    exit 2) naming the first field that is wrong. Says nothing about whether the content is genuine: that is the
    hashes' and the signature's job."""
    files = index.get("files", [])
    if not isinstance(files, list) or not isinstance(index.get("model", {}), dict) or not isinstance(
            index.get("artifacts", []), list):
        raise _bad(path, "'files', 'artifacts' or 'model' has the wrong type")
    listed: set[str] = set()
    for n, f in enumerate(files):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("bytes")) is int
                and isinstance(f.get("sha256"), str)):
            raise _bad(path, f"files[{n}] is not {{path, bytes, sha256}}")
        if not safe_relpath(f["path"]):
            raise UsageError(f"{path} lists an unsafe path {f['path'][:200]!r} (absolute or with '..'): refusing "
                             "the bundle; re-pack it")
        listed.add(f["path"])
    model = index.get("model", {})
    if "name" in model and not isinstance(model["name"], str):
        raise _bad(path, "model.name is not a string")
    size = model.get("input_size", [0, 0, 0])
    if not (isinstance(size, list) and len(size) == 3 and all(type(x) is int for x in size)):
        raise _bad(path, "model.input_size is not [C, H, W]")
    for n, a in enumerate(index.get("artifacts", [])):
        _check_artifact(path, n, a, listed)
    skipped = index.get("skipped", [])
    if not isinstance(skipped, list) or not all(
            isinstance(x, dict) and all(isinstance(x.get(k), str) for k in ("target", "precision", "reason"))
            for x in skipped):
        raise _bad(path, "'skipped' is not a list of {target, precision, reason}")
    det = index.get("deterministic")
    if det is not None and not (isinstance(det, dict) and isinstance(det.get("varies", {}), dict)
                                and isinstance(det.get("identical", []), list)):
        raise _bad(path, "'deterministic' is not {identical, varies, note}")


def _check_artifact(path: Path, n: int, a: Any, listed: set[str]) -> None:
    """artifacts[n]: an object with string target/precision/dir/status, a model file inside its dir that the index
    hashes (model.<ext>, never the dir's manifest.json or a bundle-level file such as labels.txt)."""
    where = f"artifacts[{n}]"
    if not isinstance(a, dict):
        raise _bad(path, f"{where} is {type(a).__name__}, not an object")
    for k in ("target", "precision", "dir", "status"):
        if not isinstance(a.get(k), str) or not a[k]:
            raise _bad(path, f"{where}.{k} is missing or not a string")
    if a["status"] not in ARTIFACT_STATUSES:
        raise _bad(path, f"{where}.status {a['status'][:40]!r} is not one of {', '.join(ARTIFACT_STATUSES)}")
    for k in ("error",):
        if a.get(k) is not None and not isinstance(a[k], str):
            raise _bad(path, f"{where}.{k} is not a string")
    for k in ("parity", "accuracy"):
        if a.get(k) is not None and not isinstance(a[k], dict):
            raise _bad(path, f"{where}.{k} is not an object")
    if a.get("bytes") is not None and type(a["bytes"]) not in (int, float):
        raise _bad(path, f"{where}.bytes is not a number")
    if not safe_relpath(a["dir"]) or a["dir"] in RESERVED:
        raise UsageError(f"{path}: {where}.dir {a['dir'][:200]!r} is not a relative path inside the bundle "
                         "(absolute, '..', or a bundle file): refusing the bundle; re-pack it")
    mf = a.get("model_file")
    if mf is None:
        if a["status"] != "export-failed":
            raise _bad(path, f"{where} ({a['status']}) has no model_file")
        return
    if not isinstance(mf, str):
        raise _bad(path, f"{where}.model_file is not a string")
    if not safe_relpath(mf):
        raise UsageError(f"{path}: {where}.model_file {mf[:200]!r} is not a relative path inside the bundle "
                         "(absolute or with '..'): refusing the bundle; re-pack it")
    name = mf[len(a["dir"]) + 1:] if mf.startswith(a["dir"] + "/") else ""
    if "/" in name or name in RESERVED or not _MODEL_NAME.fullmatch(name):
        raise _bad(path, f"{where}.model_file {mf[:200]!r} is not a model file of {a['dir']}/ "
                         "(expected <dir>/model.<ext>)")
    if mf not in listed and not any(p.startswith(mf + "/") for p in listed):
        raise _bad(path, f"{where}.model_file {mf[:200]!r} is not among the files bundle.json hashes")


def safe_relpath(rel: str) -> bool:
    """A posix path relative to the bundle root that stays inside it: not empty, not absolute (nor a drive letter),
    no '..', no '\\'."""
    parts = rel.split("/")
    return (bool(rel) and not rel.startswith("/") and "\\" not in rel and ".." not in parts and "" not in parts
            and not re.match(r"^[A-Za-z]:", rel))


def check(root: Path, index: dict[str, Any] | None = None) -> list[str]:
    """Every difference between the bundle on disk and its index, one line each ([] when intact): a changed file
    (size or sha256), a listed file that is missing, a file that is not listed (effai.files.check_entries)."""
    index = read(root) if index is None else index
    return files.check_entries(Path(root), index.get("files", []), "the index", (INDEX, SIGNATURE))
