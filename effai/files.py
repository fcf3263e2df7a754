"""File helpers shared by the zoo (weights provenance) and export (manifests)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(root: Path, exclude: frozenset[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """[{path, bytes, sha256}] of every regular file below `root` (posix paths, sorted), but those in `exclude`.
    The one file listing behind artifact manifests and bundle indexes."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256(p)})
    return out


def inside(root: Path, rel: object) -> Path | None:
    """root/rel when `rel` is a relative path that stays inside root (no absolute path, no '..', no symlink
    leading out); None otherwise. Manifests and bundle indexes are untrusted: every path they name goes through here."""
    from pathlib import PurePosixPath

    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
        return None
    p = Path(root) / pure
    try:
        real_root = Path(root).resolve(strict=True)
        real = p.resolve()
    except (OSError, RuntimeError):   # a symlink loop
        return None
    if real != real_root and real_root not in real.parents:
        return None
    return p


def unlisted(root: Path, listed: set[str], exclude: frozenset[str] | tuple[str, ...] = ()) -> list[str]:
    """Files (and symlinks) under root that `listed` does not name, apart from those in `exclude` (posix, sorted)."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_symlink() or not p.is_dir()) and rel not in listed and rel not in exclude:
            out.append(rel)
    return out


def check_entries(root: Path, entries: list[Any], listed_in: str,
                  exclude: frozenset[str] | tuple[str, ...] = ()) -> list[str]:
    """The one hash check behind artifact manifests and bundle indexes: every difference between the files under
    `root` and `entries` ([{path, bytes, sha256}], untrusted), one line each, [] when intact. Lines:
    'refused: P (...)' for a path leading outside root, 'missing: P', 'not a regular file: P',
    'changed: P (N bytes, LISTED_IN says M)' or 'changed: P (sha256 ab..., LISTED_IN says cd...)', and
    'not in LISTED_IN: P' for a file root holds that the entries do not name."""
    root = Path(root)
    problems: list[str] = []
    listed: set[str] = set()
    for f in entries:
        rel = f.get("path") if isinstance(f, dict) else None
        p = inside(root, rel)
        if p is None or not isinstance(f, dict):
            problems.append(f"refused: {str(rel)[:80]} (not a path inside the directory: absolute, '..' or a "
                            "symlink leading out)")
            continue
        listed.add(rel)
        if not p.exists() and not p.is_symlink():
            problems.append(f"missing: {rel}")
        elif p.is_symlink() or not p.is_file():
            problems.append(f"not a regular file: {rel}")
        elif p.stat().st_size != f.get("bytes"):
            problems.append(f"changed: {rel} ({p.stat().st_size} bytes, {listed_in} says {f.get('bytes')})")
        else:
            got, want = sha256(p), str(f.get("sha256"))
            if got != want:
                problems.append(f"changed: {rel} (sha256 {got[:12]}..., {listed_in} says {want[:12]}...)")
    problems += [f"not in {listed_in}: {rel}" for rel in unlisted(root, listed, exclude)]
    return problems


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then os.replace: readers see the old file or the new
    one, never half of one. The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600, or
    `mode` (0o600 for a private key: set before the first byte is written)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def staging_dir(dest: Path, mode: int = 0o777) -> Path:
    """A fresh `.NAME.tmp-PID-XXXXXXXX` directory beside `dest` to build it in (then `replace_dir`), after removing
    the ones killed processes left there. Shared by export artifact dirs, bundles, installs, archives and DeViT
    exports. `mode` (umask applied): 0o700 keeps a half-built install private, as mkdtemp did."""
    import os
    import uuid

    dest = Path(dest)
    remove_stale(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=mode)
    return tmp


def remove_stale(out: Path) -> list[Path]:
    """Remove the temp dirs beside `out` that a killed export left (`.NAME.tmp-PID-XXXXXXXX` of a PID no longer
    alive; a pre-PID `.NAME.tmp-XXXXXXXX` or an `.NAME.old-XXXXXXXX` older than a day). Returns what was removed."""
    import re
    import shutil
    import time

    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp-(\d+)-|tmp-|old-)[0-9a-f]{{8}}$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        if m.group(1) is not None:
            if _alive(int(m.group(1))):
                continue
        elif time.time() - p.stat().st_mtime < 86400:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # another user's process
        return True
    return True
    return True


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory `tmp` to `dest`, replacing an earlier `dest` only once the new one is in place
    (the old one is renamed aside first and put back if the move fails). Shared by export artifact dirs, bundles
    and installs."""
    import os
    import shutil
    import uuid

    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


MAX_JSON_BYTES = 64 << 20      # manifests, indexes and reports are kilobytes; a bound keeps a hostile file cheap


def loads_json(text: str | bytes, what: str) -> object:
    """json.loads for text effai did not write itself: malformed, deeply nested (RecursionError) or oversized input
    becomes a one-line UsageError naming `what` (e.g. "bundle.json of DIR") instead of an internal error."""
    import json

    from effai.errors import UsageError

    if len(text) > MAX_JSON_BYTES:
        raise UsageError(f"{what} is {len(text):,} bytes, over effai's {MAX_JSON_BYTES:,}-byte limit for JSON; "
                         "it is not a file effai wrote")
    try:
        return json.loads(text)
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply to be a file effai wrote; refusing it") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} is not valid JSON ({e}); restore it or produce it again") from None


def read_json(path: Path, what: str | None = None) -> object:
    """Read and parse a JSON file with `loads_json`'s bounds; a missing or unreadable file is a UsageError too."""
    import os

    from effai.errors import UsageError

    path = Path(path)
    what = what or str(path)
    try:
        size = os.stat(path).st_size
        if size > MAX_JSON_BYTES:
            raise UsageError(f"{what} is {size:,} bytes, over effai's {MAX_JSON_BYTES:,}-byte limit for JSON; "
                             "it is not a file effai wrote")
        data = path.read_bytes()
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{what} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read {what}: {e.strerror or e}") from None
    return loads_json(data, what)


MAX_NPZ_BYTES = 16 << 30   # arrays effai reads from an .npz (datasets, calibration, parity data): at most 16 GiB


def npz_limit() -> int:
    """Bytes of arrays an .npz may declare: MAX_NPZ_BYTES, or half the memory available now when that is less."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return min(MAX_NPZ_BYTES, avail // 2)
    except (OSError, StopIteration, ValueError, IndexError):
        return MAX_NPZ_BYTES


def npz_headers(path: Path, what: str, names: tuple[str, ...] | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of the arrays in an .npz, read from the member headers without reading any data. An
    empty, non-zip or damaged file, an object (pickled) array, or arrays declaring more bytes than `npz_limit()`
    (counting only `names` when given) are a UsageError naming `what`, before numpy allocates anything."""
    import math
    import zipfile

    from numpy.lib import format as npf

    from effai.errors import UsageError

    limit = npz_limit()
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    try:
        if Path(path).stat().st_size == 0:
            raise UsageError(f"{what} is an empty file (0 bytes), not an .npz; write it again with numpy.savez")
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with z.open(info) as f:
                    version = npf.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npf.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = npf.read_array_header_2_0(f)
                    else:
                        shape, _, dtype = npf._read_array_header(f, version)  # (3, 0): no public reader
                if dtype.hasobject:
                    raise UsageError(f"{what}: array '{name}' holds Python objects (it would need unpickling); "
                                     "refusing it: save plain numeric arrays")
                out[name] = (tuple(int(d) for d in shape), dtype)
    except UsageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise UsageError(f"{what} is not a readable .npz ({type(e).__name__}: {str(e)[:160]}); write it again "
                         "with numpy.savez") from None
    total = sum(math.prod(s) * d.itemsize for n, (s, d) in out.items() if names is None or n in names)
    if total > limit:
        shapes = ", ".join(f"{n} {s} {d}" for n, (s, d) in out.items() if names is None or n in names)
        raise UsageError(f"{what} declares {total / 2**30:,.1f} GiB of arrays ({shapes[:200]}), over effai's limit "
                         f"of {limit / 2**30:,.1f} GiB (the smaller of {MAX_NPZ_BYTES >> 30} GiB and half the free "
                         "memory); the file is damaged, or split it into smaller sets")
    return out


def names_schema(path: Path, schema: str) -> bool:
    """Is `path` a JSON object naming `schema` (a cheap "is this one of ours?" probe)? Read as read_json reads (size
    bound, nesting guard); anything unreadable is "no", and the kind's full reader says what is wrong with it."""
    from effai.errors import UsageError

    try:
        data = read_json(path)
    except UsageError:
        return False
    return isinstance(data, dict) and data.get("schema") == schema
