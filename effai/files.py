"""File helpers shared by the zoo (weights provenance) and export (manifests)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
