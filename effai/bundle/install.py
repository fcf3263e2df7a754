"""Copy a bundle, or just what an app needs from it, out of a bundle directory or archive, verifying on the way.

`unpack(BUNDLE, into)` copies the whole bundle after `sign.verify` passes; `install(BUNDLE, into, target)` copies
one artifact (model file, its manifest.json as the sidecar, labels.txt, preprocessing.json, MODEL_CARD.md), each
file hashed as it is copied, into a temp dir renamed into place at the end: a refusal leaves `into` as it was.
`force`, signatures, what is checked: docs/bundle.md, "effai/bundle/install.py".
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from effai.bundle import archive, sign
from effai.bundle import index as index_mod
from effai.files import staging_dir
from effai.errors import EffaiError, UsageError
from effai.files import read_json, replace_dir

APP_FILES = ("labels.txt", "preprocessing.json", "MODEL_CARD.md")
USABLE = ("pass", "unverified")
_CHUNK = 1 << 20


INSTALL_MARKER = ".effai-install.json"   # written by install; --force replaces only a folder that holds it

def _safe_rel(rel: Any, root: Path) -> str:
    """A path from bundle.json that stays inside the bundle (no absolute path, '..' or backslash)."""
    text = str(rel)
    parts = text.split("/")
    if not text or text.startswith("/") or "\\" in text or re.match(r"^[A-Za-z]:", text) or ".." in parts \
            or "" in parts:
        raise EffaiError(f"{root / index_mod.INDEX} lists the unsafe path {text!r}; refusing to copy anything from "
                         "this bundle (it was edited by hand or maliciously)")
    return text


def _prepare(into: Path, force: bool, marker: tuple[str, ...]) -> None:
    """Refuse a destination that holds something other than an earlier effai copy (or anything, without force)."""
    if not into.exists():
        return
    if not into.is_dir():
        raise UsageError(f"--into {into} is a file; pass a folder to create")
    if not any(into.iterdir()):
        return
    if not force:
        raise UsageError(f"--into {into} exists and is not empty; choose a new folder, or pass --force to replace an "
                         "earlier effai unpack/install there")
    if not any((into / m).is_file() for m in marker):
        raise UsageError(f"--into {into} is not an earlier effai unpack/install (no {' or '.join(marker)}); "
                         "refusing to replace it: choose a new folder")


def _copy_verified(root: Path, rel: str, want: dict[str, Any], dest: Path) -> int:
    """Copy root/rel to dest, hashing the bytes read; EffaiError when they differ from the index entry."""
    src = root / rel
    if not src.is_file():
        raise EffaiError(f"missing: {rel} (listed in bundle.json); the bundle is incomplete: nothing was installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, n = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dest, "xb") as fo:
        for chunk in iter(lambda: fi.read(_CHUNK), b""):
            h.update(chunk)
            n += len(chunk)
            fo.write(chunk)
    if n != want.get("bytes") or h.hexdigest() != want.get("sha256"):
        raise EffaiError(f"changed: {rel} (sha256 {h.hexdigest()[:12]}..., bundle.json says "
                         f"{str(want.get('sha256'))[:12]}...); refusing to install a tampered file: nothing was "
                         "installed")
    return n


def _stage_copy(root: Path, into: Path, plan: list[tuple[str, str]], listed: dict[str, dict[str, Any]],
                extra: list[tuple[Path, str]] | None = None, before_swap: Callable[[Path], None] | None = None,
                notes: dict[str, str] | None = None) -> int:
    """Copy plan [(bundle rel, dest rel)] (+ `extra` files copied as is) into a temp folder beside `into`, run
    `before_swap(staged)` (raises to refuse), then swap it in. Returns the bytes copied."""
    into.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(into, mode=0o700)
    total = 0
    try:
        base = staged.resolve()
        if len({out_rel for _, out_rel in plan}) != len(plan):
            raise EffaiError(f"two bundle files would be installed under the same name in {into}; the bundle was "
                             "edited: re-pack it")
        for rel, out_rel in plan:
            dest = staged / out_rel
            if not dest.resolve().is_relative_to(base):
                raise EffaiError(f"{out_rel} would be written outside {into}; refusing")
            total += _copy_verified(root, rel, listed[rel], dest)
        for src, out_rel in extra or []:
            shutil.copyfile(src, staged / out_rel)
        for out_rel, text in (notes or {}).items():
            (staged / out_rel).write_text(text)
        if before_swap is not None:
            before_swap(staged)
        os.chmod(staged, 0o755 & ~_umask())
        replace_dir(staged, into)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _short(problems: list[str], n: int = 3) -> str:
    return "; ".join(problems[:n]) + (f"; and {len(problems) - n} more" if len(problems) > n else "")


def unpack(bundle: Path, into: Path, pubkey: Path | None = None, force: bool = False) -> dict[str, Any]:
    """The whole bundle (directory or archive) copied to `into`, after verify passes (every file and the signature;
    with `pubkey`, signed by that key)."""
    into = Path(into)
    _prepare(into, force, (index_mod.INDEX,))
    with archive.opened(Path(bundle)) as root:
        result = sign.verify(root, pubkey)
        if not result.ok:
            raise EffaiError(f"{bundle} fails verification ({_short(result.problems)}); nothing was unpacked")
        index = index_mod.read(root)
        listed = {_safe_rel(f.get("path"), root): f for f in index.get("files", [])}
        extra = [(root / index_mod.INDEX, index_mod.INDEX)]
        if (root / index_mod.SIGNATURE).is_file():
            extra.append((root / index_mod.SIGNATURE, index_mod.SIGNATURE))

        def recheck(staged: Path) -> None:
            # bundle.json and bundle.sig were copied as bytes after verify: check the copy's signature once more
            # (cheap, no re-hash), so a source changed mid-copy cannot slip through.
            again = sign.check_signature(staged, index_mod.read(staged), pubkey)
            copied = index_mod.read(staged).get("files") == index.get("files")
            if again.problems or not copied:
                raise EffaiError(f"{bundle} changed while it was copied ({_short(again.problems) or 'bundle.json'}"
                                 "); nothing was unpacked: unpack again")

        total = _stage_copy(root, into, [(rel, rel) for rel in sorted(listed)], listed, extra, recheck)
    return {"into": str(into), "model": (index.get("model") or {}).get("name"), "files": len(listed),
            "bytes": total, "signature": result.signature, "key_id": result.key_id, "trusted": result.trusted,
            "notes": list(result.notes)}


def available(index: dict[str, Any]) -> list[str]:
    """'target/precision (status)' for every artifact a bundle lists."""
    return [f"{a.get('target')}/{a.get('precision')} ({a.get('status')})" for a in index.get("artifacts", [])]


def select(index: dict[str, Any], target: str, precision: str | None = None) -> dict[str, Any]:
    """The artifact entry for target (and precision); UsageError listing what the bundle has."""
    arts = [a for a in index.get("artifacts", []) if isinstance(a, dict)]
    have = ", ".join(available(index)) or "no artifacts"
    matches = [a for a in arts if a.get("target") == target]
    if not matches:
        close = difflib.get_close_matches(target, sorted({str(a.get("target")) for a in arts}), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"this bundle has no {target} artifact; {hint}it has: {have} (choose one with --target)")
    if precision is not None:
        chosen = [a for a in matches if a.get("precision") == precision]
        if not chosen:
            precs = ", ".join(str(a.get("precision")) for a in matches)
            raise UsageError(f"this bundle has no {target} artifact at precision {precision}; {target} comes as: "
                             f"{precs} (pass one with --precision)")
        art = chosen[0]
    elif len(matches) == 1:
        art = matches[0]
    else:
        usable = [a for a in matches if a.get("status") in USABLE]
        if len(usable) != 1:
            precs = ", ".join(f"{a.get('precision')} ({a.get('status')})" for a in matches)
            raise UsageError(f"this bundle has several {target} artifacts: {precs}; choose one with --precision")
        art = usable[0]
    label = f"{art.get('target')}/{art.get('precision')}"
    if art.get("status") == "export-failed":
        raise EffaiError(f"the {label} export failed when the bundle was packed ({art.get('error')}); install one "
                         f"of the others: {have}")
    if art.get("status") not in USABLE:
        raise EffaiError(f"the {label} artifact has status {art.get('status')!r} (it failed its parity/accuracy "
                         f"gate and must not ship: {art.get('error') or 'see MODEL_CARD.md'}); install one of the "
                         f"others: {have}")
    return art


def install(bundle: Path, into: Path, target: str, precision: str | None = None, pubkey: Path | None = None,
            force: bool = False) -> dict[str, Any]:
    """Copy one artifact's model file (or .mlpackage folder), its manifest.json, and the bundle's labels.txt,
    preprocessing.json and MODEL_CARD.md to `into`, each file verified against bundle.json on the way."""
    into = Path(into)
    _prepare(into, force, (INSTALL_MARKER,))
    with archive.opened(Path(bundle)) as root:
        index = index_mod.read(root)
        check = sign.check_signature(root, index, pubkey)
        if check.problems:
            raise EffaiError(f"{bundle}: {_short(check.problems)}; nothing was installed")
        art = select(index, target, precision)
        listed = {_safe_rel(f.get("path"), root): f for f in index.get("files", [])}
        art_dir = _safe_rel(art.get("dir"), root)
        model_file = _safe_rel(art.get("model_file"), root)
        name = model_file.rsplit("/", 1)[-1]
        plan = [(rel, name + rel[len(model_file):]) for rel in sorted(listed)
                if rel == model_file or rel.startswith(model_file + "/")]
        if not plan:
            raise EffaiError(f"bundle.json lists no file for {model_file}, the {target} model; the bundle is "
                             "incomplete: re-pack it")
        manifest = f"{art_dir}/manifest.json"
        if manifest not in listed:
            raise EffaiError(f"bundle.json lists no {manifest}; the bundle is incomplete: re-pack it")
        named = read_json(root / manifest, f"{manifest} of {bundle}")   # hostile JSON: UsageError, not a crash
        named = named.get("model_file") if isinstance(named, dict) else None
        if named != name:
            raise UsageError(f"{bundle}: bundle.json names {model_file} as the {target} model but {manifest} names "
                             f"{str(named)[:80]!r}; the bundle was edited: re-pack it")
        plan.append((manifest, "manifest.json"))
        notes = list(check.notes)
        for rel in APP_FILES:
            if rel in listed:
                plan.append((rel, rel))
            else:
                notes.append(f"the bundle has no {rel}")
        if art.get("status") == "unverified":
            notes.append(f"the {target} artifact is unverified (no {target} runtime where it was packed: checked "
                         "structurally only); test it on a device")
        marker = json.dumps({"installed_by": "effai zoo install", "model": (index.get("model") or {}).get("name"),
                             "target": art.get("target"), "precision": art.get("precision")}, sort_keys=True)
        total = _stage_copy(root, into, plan, listed, notes={INSTALL_MARKER: marker + "\n"})
    return {"into": str(into), "model": (index.get("model") or {}).get("name"), "target": art.get("target"),
            "precision": art.get("precision"), "status": art.get("status"), "model_file": name,
            "files": sorted({out.split("/", 1)[0] for _, out in plan}), "bytes": total,
            "signature": check.state, "key_id": check.key_id, "trusted": check.trusted, "notes": notes}
