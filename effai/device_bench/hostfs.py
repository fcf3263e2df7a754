"""The host's own files and programs as a DeviceFS (base.py), rooted under sysfs_root() so tests can fake a device.

Device paths are absolute and resolve to `root / path` (EFFAI_SYSFS_ROOT, default "/"); off "/" run() looks in
`root/bin` first. Also `glob`, `read_number`: helpers every meter uses over any DeviceFS (local, adb, ssh).
More: docs/bench.md, "effai/device_bench/hostfs.py".
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from pathlib import Path

from effai.device_bench.base import DeviceFS, sysfs_root


class LocalFS:
    """DeviceFS of this machine. `root` defaults to sysfs_root() (EFFAI_SYSFS_ROOT or "/") read at construction."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else sysfs_root()

    def _resolve(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def read_text(self, path: str) -> str | None:
        try:
            return self._resolve(path).read_text(errors="replace")
        except (OSError, ValueError):
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._resolve(path)))
        except (OSError, ValueError):
            return []

    def _program(self, name: str) -> str | None:
        """Path of the program to run: root/bin/NAME first when the root is fake, then PATH."""
        if "/" in name:
            return name if os.access(name, os.X_OK) else None
        if self.root != Path("/"):
            planted = self.root / "bin" / name
            if planted.is_file() and os.access(planted, os.X_OK):
                return str(planted)
        return shutil.which(name)

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        """Run argv (a list, never through a shell); (exit code, stdout). 127 when the program is missing, 124 on
        timeout (with what it printed so far), 126 when it exists but cannot be executed."""
        if not argv:
            raise ValueError("run() needs a program name")
        program = self._program(argv[0])
        if program is None:
            return 127, ""
        try:
            proc = subprocess.run([program, *argv[1:]], capture_output=True, text=True, timeout=timeout,
                                  errors="replace")
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return 124, out
        except OSError:
            return 126, ""
        return proc.returncode, proc.stdout

    def __repr__(self) -> str:
        return f"LocalFS(root={str(self.root)!r})"


def glob(fs: DeviceFS, pattern: str) -> list[str]:
    """Absolute device paths matching a shell-style pattern ("/sys/class/hwmon/hwmon*/name"), sorted, using only
    listdir, so it works on any DeviceFS. Wildcards may appear in any component; the last component may be a file."""
    parts = [p for p in pattern.split("/") if p]
    found = ["/"]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt: list[str] = []
        for base in found:
            prefix = base.rstrip("/")
            if not any(c in part for c in "*?["):
                # A literal component: keep it if its parent lists it (or, for a final file, if it reads).
                names = fs.listdir(base)
                if part in names or (last and fs.read_text(f"{prefix}/{part}") is not None):
                    nxt.append(f"{prefix}/{part}")
                continue
            nxt.extend(f"{prefix}/{name}" for name in fs.listdir(base) if fnmatch.fnmatchcase(name, part))
        found = nxt
        if not found:
            return []
    return sorted(found)


def read_number(fs: DeviceFS, path: str) -> float | None:
    """A sysfs file holding one number (e.g. energy_uj, temp), or None when missing, unreadable or not a number."""
    text = fs.read_text(path)
    if text is None:
        return None
    try:
        return float(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def read_line(fs: DeviceFS, path: str) -> str | None:
    """First line of a device file, stripped (NULs removed: device-tree strings end with one), None if unreadable."""
    text = fs.read_text(path)
    if text is None:
        return None
    text = text.replace("\x00", "").strip()
    return text.splitlines()[0].strip() if text else ""
