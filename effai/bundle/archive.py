"""Bundles as one file: read .zip / .tar.gz / .tgz archives of a bundle safely, and write them deterministically.

Reading checks every entry BEFORE anything is written (traversal, links and special files, duplicates, encryption,
sizes against MAX_TOTAL_BYTES / MAX_ENTRIES / MAX_RATIO) and refuses the first bad one with a one-line UsageError.
`make_archive` gives the same bytes for the same bundle. Rules: docs/bundle.md, "effai/bundle/archive.py".
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from effai.bundle import index as index_mod
from effai.files import staging_dir
from effai.errors import EffaiError, UsageError

SUFFIXES = (".zip", ".tar.gz", ".tgz")
MAX_TOTAL_BYTES = 4 << 30          # 4 GiB uncompressed in all
MAX_ENTRIES = 100_000
MAX_RATIO = 200                    # uncompressed / compressed
RATIO_FLOOR = 1 << 20              # the ratio is only checked above 1 MiB (tiny text files compress very well)
DEFAULT_EPOCH = 315532800          # 1980-01-01T00:00:00Z, the earliest time a zip can hold
IGNORED_TOP = ("__MACOSX", ".DS_Store")
_CHUNK = 1 << 20


def kind(path: Path) -> str | None:
    """'zip' or 'tar' from the file name, None when it is not an archive name effai reads."""
    name = Path(path).name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar"
    return None


@dataclass(frozen=True)
class Entry:
    name: str          # normalized posix path relative to the archive root ("a/b.txt")
    is_dir: bool
    size: int
    ref: Any           # zipfile.ZipInfo | tarfile.TarInfo


def _refuse(archive: Path, raw: str, why: str) -> UsageError:
    return UsageError(f"{archive}: refusing entry {raw!r}: {why}; the archive is unsafe or damaged, so nothing was "
                      "extracted (re-create it with effai bundle archive)")


def _normalize(archive: Path, raw: str) -> str:
    """The entry name as a safe relative posix path ('' for the archive root itself)."""
    if "\x00" in raw:
        raise _refuse(archive, raw, "NUL character in the name")
    if "\\" in raw:
        raise _refuse(archive, raw, "backslash in the name (a Windows path separator could escape the destination)")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise _refuse(archive, raw, "absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, raw, "'..' in the path (path traversal)")
    return "/".join(parts)


def _check_sizes(archive: Path, raw: str, total: int, count: int) -> None:
    if total > MAX_TOTAL_BYTES:
        raise _refuse(archive, raw, f"the entries add up to more than {MAX_TOTAL_BYTES >> 30} GiB uncompressed")
    if count > MAX_ENTRIES:
        raise _refuse(archive, raw, f"more than {MAX_ENTRIES} entries")


def _zip_entries(archive: Path, zf: zipfile.ZipFile) -> list[tuple[str, Entry]]:
    out, total = [], 0
    for i, info in enumerate(zf.infolist(), 1):
        raw = info.filename
        mode = info.external_attr >> 16
        ftype = stat.S_IFMT(mode) if info.create_system == 3 else 0
        if ftype == stat.S_IFLNK:
            raise _refuse(archive, raw, "symlink")
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse(archive, raw, "not a regular file or directory (device, FIFO or socket)")
        if info.flag_bits & 0x1:
            raise _refuse(archive, raw, "encrypted entry")
        total += info.file_size
        _check_sizes(archive, raw, total, i)
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise _refuse(archive, raw, f"compression ratio over {MAX_RATIO}:1 ({info.file_size} bytes from "
                                        f"{info.compress_size}; a zip bomb?)")
        is_dir = info.is_dir() or ftype == stat.S_IFDIR
        out.append((raw, Entry(_normalize(archive, raw), is_dir, 0 if is_dir else info.file_size, info)))
    return out


def _tar_entries(archive: Path, tf: tarfile.TarFile) -> list[tuple[str, Entry]]:
    out, total = [], 0
    for i, m in enumerate(tf, 1):       # lazily: sizes are checked before the stream is skipped past an entry
        raw = m.name
        if m.issym():
            raise _refuse(archive, raw, f"symlink (to {m.linkname!r})")
        if m.islnk():
            raise _refuse(archive, raw, f"hardlink (to {m.linkname!r})")
        if m.ischr() or m.isblk():
            raise _refuse(archive, raw, "device file")
        if m.isfifo():
            raise _refuse(archive, raw, "FIFO")
        if not (m.isreg() or m.isdir()):
            raise _refuse(archive, raw, "not a regular file or directory")
        total += m.size
        _check_sizes(archive, raw, total, i)
        out.append((raw, Entry(_normalize(archive, raw), m.isdir(), 0 if m.isdir() else m.size, m)))
    packed = archive.stat().st_size
    if total > RATIO_FLOOR and total > MAX_RATIO * max(packed, 1):
        raise _refuse(archive, out[-1][0] if out else "", f"compression ratio over {MAX_RATIO}:1 ({total} bytes "
                                                          f"from {packed}; a gzip bomb?)")
    return out


def _validate(archive: Path, listed: list[tuple[str, Entry]]) -> list[Entry]:
    """Duplicates and entries below a file are refused; the archive root entry ('./') is dropped."""
    seen: dict[str, Entry] = {}
    for raw, e in listed:
        if not e.name:
            if not e.is_dir:
                raise _refuse(archive, raw, "a file named like the archive root")
            continue
        if e.name in seen:
            raise _refuse(archive, raw, f"duplicate entry (the archive holds {e.name} twice)")
        seen[e.name] = e
    for name, e in seen.items():
        parts = name.split("/")
        for k in range(1, len(parts)):
            parent = seen.get("/".join(parts[:k]))
            if parent is not None and not parent.is_dir:
                raise _refuse(archive, e.ref.filename if isinstance(e.ref, zipfile.ZipInfo) else e.ref.name,
                              f"it lies below {parent.name}, which is a file")
    return list(seen.values())


def entries(archive: Path) -> list[Entry]:
    """Every entry of a bundle archive, checked (see the module doc); UsageError for the first unsafe one or an
    unreadable archive."""
    archive = Path(archive)
    k = kind(archive)
    if k is None:
        raise UsageError(f"{archive} is not a .zip, .tar.gz or .tgz; pass a bundle directory or an archive of one")
    if not archive.is_file():
        raise UsageError(f"{archive} does not exist; pass a bundle directory or a .zip / .tar.gz of one")
    try:
        if k == "zip":
            with zipfile.ZipFile(archive) as zf:
                return _validate(archive, _zip_entries(archive, zf))
        with tarfile.open(archive, "r:gz") as tf:
            return _validate(archive, _tar_entries(archive, tf))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise UsageError(f"{archive} cannot be read as a {'zip' if k == 'zip' else 'tar.gz'} ({e}); re-download or "
                         "re-create it") from None


def extract(archive: Path, dest: Path) -> Path:
    """Extract a checked archive into `dest` (created; must be empty when it exists) and return the bundle root
    inside it. Nothing is written unless every entry passed the checks, and a failure half-way leaves no `dest`
    behind (extraction goes to a temp directory beside it, renamed at the end)."""
    archive, dest = Path(archive), Path(dest)
    checked = entries(archive)
    if dest.exists():
        if not dest.is_dir() or any(dest.iterdir()):
            raise UsageError(f"{dest} exists and is not an empty directory; extract into a new directory")
        dest.rmdir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(dest, mode=0o700)
    try:
        base = tmp.resolve()
        if kind(archive) == "zip":
            with zipfile.ZipFile(archive) as zf:
                for e in checked:
                    _place(archive, base, e, lambda e=e: zf.open(e.ref))
        else:
            with tarfile.open(archive, "r:gz") as tf:
                for e in checked:
                    _place(archive, base, e, lambda e=e: tf.extractfile(e.ref))
        os.rename(tmp, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"{archive}: extraction failed ({e}); the archive is damaged: re-download or re-create "
                         "it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return bundle_root(dest, archive)


def _place(archive: Path, base: Path, e: Entry, open_src: Any) -> None:
    target = base.joinpath(*e.name.split("/"))
    if e.is_dir:
        target.mkdir(parents=True, exist_ok=True)
        parent = target
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent
    if not parent.resolve().is_relative_to(base):
        raise _refuse(archive, e.name, "it resolves outside the destination")
    if e.is_dir:
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        src: BinaryIO | None = open_src()
        if src is None:
            raise _refuse(archive, e.name, "no data")
        with src:
            left = e.size
            while True:
                chunk = src.read(min(_CHUNK, left + 1))
                if not chunk:
                    break
                left -= len(chunk)
                if left < 0:
                    raise _refuse(archive, e.name, "more data than the entry declares")
                out.write(chunk)
        if left:
            raise _refuse(archive, e.name, f"{left} bytes fewer than the entry declares (truncated)")


def bundle_root(dest: Path, archive: Path | None = None) -> Path:
    """The directory holding bundle.json: `dest` itself or its one top-level directory."""
    if (dest / index_mod.INDEX).is_file():
        return dest
    tops = [p for p in dest.iterdir() if p.name not in IGNORED_TOP]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / index_mod.INDEX).is_file():
        return tops[0]
    where = archive or dest
    raise UsageError(f"{where} holds no {index_mod.INDEX} at its top level or in one top-level directory: not an "
                     "effai bundle (make one with effai bundle pack, and an archive of it with effai bundle archive)")


@contextmanager
def opened(path: Path) -> Iterator[Path]:
    """A bundle directory as is, or an archive extracted into a temporary directory removed afterwards; yields the
    bundle root."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass a bundle directory written by effai bundle pack, or a .zip / "
                         ".tar.gz of one")
    if kind(path) is None:
        raise UsageError(f"{path} is neither a bundle directory nor a .zip / .tar.gz / .tgz archive of one")
    with tempfile.TemporaryDirectory(prefix="effai-bundle-") as tmp:
        yield extract(path, Path(tmp) / "x")


# ------------------------------------------------------------------------------------------------------ writing


def _epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return DEFAULT_EPOCH
    try:
        return max(int(value), DEFAULT_EPOCH)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds; unset it or fix it") from None


def make_archive(root: Path, dest: Path) -> dict[str, Any]:
    """Write the bundle at `root` as one deterministic .zip or .tar.gz (chosen by `dest`'s name) holding one
    top-level directory named like the bundle. Refuses a bundle whose files do not match its index, or whose
    signature is invalid or was removed."""
    root, dest = Path(root), Path(dest)
    k = kind(dest)
    if k is None:
        raise UsageError(f"{dest} must end in .zip, .tar.gz or .tgz")
    index = index_mod.read(root)
    problems = index_mod.check(root, index)
    if problems:
        raise EffaiError(f"refusing to archive {root}: its files do not match bundle.json ({problems[0]}"
                         f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}); re-pack it")
    from effai.bundle import sign

    sig = sign.check_signature(root, index)
    if sig.state in ("invalid", "removed"):
        raise EffaiError(f"refusing to archive {root}: {sig.problems[0]}")
    base = root.resolve()
    if dest.resolve().is_relative_to(base):
        raise UsageError(f"{dest} is inside the bundle {root}; write the archive somewhere else")
    paths = sorted(base.rglob("*"), key=lambda p: p.relative_to(base).as_posix())
    for p in paths:
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise EffaiError(f"{p} is a symlink or special file; a bundle holds only regular files: re-pack it")
    top = base.name
    epoch = _epoch()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        if k == "zip":
            _write_zip(Path(tmp), base, top, paths, epoch)
        else:
            _write_tar(Path(tmp), base, top, paths, epoch)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    files = sum(1 for p in paths if p.is_file())
    return {"archive": str(dest), "format": "zip" if k == "zip" else "tar.gz", "files": files,
            "bytes": dest.stat().st_size, "top": top}


def _write_zip(out: Path, base: Path, top: str, paths: list[Path], epoch: int) -> None:
    date_time = time.gmtime(epoch)[:6]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        entries_ = [(top + "/", None)] + [(f"{top}/{p.relative_to(base).as_posix()}" + ("/" if p.is_dir() else ""), p)
                                          for p in paths]
        for name, p in entries_:
            zi = zipfile.ZipInfo(name, date_time=date_time)
            zi.create_system = 3
            if p is None or p.is_dir():
                zi.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                zf.writestr(zi, b"")
                continue
            zi.external_attr = (stat.S_IFREG | 0o644) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            size = p.stat().st_size
            with open(p, "rb") as src, zf.open(zi, "w", force_zip64=size > 0x7FFFFFFF) as w:
                shutil.copyfileobj(src, w, _CHUNK)


def _write_tar(out: Path, base: Path, top: str, paths: list[Path], epoch: int) -> None:
    import gzip

    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=epoch) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, p in [(top, None)] + [(f"{top}/{p.relative_to(base).as_posix()}", p) for p in paths]:
            ti = tarfile.TarInfo(name)
            ti.mtime = epoch
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            if p is None or p.is_dir():
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
                continue
            ti.type = tarfile.REGTYPE
            ti.mode = 0o644
            ti.size = p.stat().st_size
            with open(p, "rb") as src:
                tf.addfile(ti, src)
