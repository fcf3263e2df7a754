"""The bench report: one JSON file (schema `effai.bench/1`) rewritten after every record, and its rich table.

Each write replaces the whole file (temp file + os.replace), so it is always valid JSON holding every record so far;
a crash leaves status "running", which `load` reads as interrupted. Stdlib only at module level (rich is imported
inside `table`). Why, and the layout: docs/bench.md, "effai/device_bench/report.py" and "Report".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from effai.device_bench.base import REPORT_SCHEMA, BenchRecord
from effai.errors import UsageError
from effai.files import MAX_JSON_BYTES, atomic_write

SCHEMA_PREFIX = "effai.bench/"
STATUSES = ("running", "complete", "interrupted")
_REQUIRED = tuple(f.name for f in dataclasses.fields(BenchRecord)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_FIELDS = {f.name for f in dataclasses.fields(BenchRecord)}


def schema_version(schema: str) -> int:
    """1 for "effai.bench/1"; -1 when the text is not an effai bench schema name."""
    m = re.fullmatch(re.escape(SCHEMA_PREFIX) + r"(\d+)", str(schema))
    return int(m.group(1)) if m else -1


CURRENT_VERSION = schema_version(REPORT_SCHEMA)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _effai_version() -> str:
    from effai.version import __version__  # effai/__init__.py is import-light (no torch)

    return __version__


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: non-finite floats become None (JSON has no NaN), tuples become lists, numpy scalars
    become Python numbers, Paths become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return _jsonable(obj.item())
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array
        return _jsonable(obj.tolist())
    return str(obj)


def record_to_dict(rec: BenchRecord) -> dict[str, Any]:
    """A BenchRecord as the JSON object stored in records[] (every field, raw samples included)."""
    return _jsonable(dataclasses.asdict(rec))


def record_from_dict(d: Any, where: str = "record") -> BenchRecord:
    """Inverse of record_to_dict. Fields a newer writer of the same schema added are kept in `extra["unknown"]`
    rather than dropped; a missing required field is a UsageError naming it."""
    if not isinstance(d, dict):
        raise UsageError(f"{where} is not a JSON object; the report is damaged: re-run effai bench")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}; the report is damaged: re-run effai bench")
    known = {k: v for k, v in d.items() if k in _FIELDS}
    unknown = {k: v for k, v in d.items() if k not in _FIELDS}
    known["samples_ms"] = [float("nan") if v is None else float(v) for v in (known.get("samples_ms") or [])]
    known["threads"] = int(known["threads"])
    for k in ("load_ms", "first_ms"):      # JSON null (a NaN when written: the run failed before it) -> NaN again
        known[k] = float("nan") if known[k] is None else float(known[k])
    if unknown:
        known["extra"] = {**(known.get("extra") or {}), "unknown": unknown}
    return BenchRecord(**known)


def _read_document(path: Path, other: str = "choose another file") -> dict[str, Any]:
    """The report's JSON document, checked to be an effai bench report this effai can read. `other` is the fix
    offered when the file is something else ("choose another --out" when writing)."""
    if not path.exists():
        raise UsageError(f"bench report {path} does not exist; pass the --out file of an earlier `effai bench` run")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an effai bench report; {other}")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UsageError(f"{path} is {size:,} bytes, over effai's {MAX_JSON_BYTES:,}-byte limit for a report; "
                             f"it is not an effai bench report: {other}")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not an effai bench report (not valid JSON: {e}); {other}") from None
    except RecursionError:
        raise UsageError(f"{path} is nested too deeply to be an effai bench report; {other}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}; {other}") from None
    version = schema_version(doc.get("schema", "")) if isinstance(doc, dict) else -1
    if version < 0 or not isinstance(doc.get("records"), list):
        raise UsageError(f"{path} is not an effai bench report; {other}")
    if version > CURRENT_VERSION:
        raise UsageError(f"{path} was written by a newer effai ({doc['schema']}); upgrade effai: pip install -U effai")
    if version < CURRENT_VERSION:
        # effai.bench/1 is the first schema effai shipped; anything older is a pre-release file without a migration.
        raise UsageError(f"{path} uses the pre-release schema {doc['schema']} that this effai cannot read "
                         f"(it reads {REPORT_SCHEMA}); re-run effai bench, or {other}")
    return doc


def load(path: Path | str) -> tuple[dict[str, Any], list[BenchRecord]]:
    """(header, records) of a report. `header` is the document without `records`: schema, effai_version,
    created_at, updated_at, status, meta (the writer's meta), sessions. A report left at status "running"
    (its writer crashed or was killed) is returned as "interrupted", with `header["crashed"] = True`.
    UsageError for a missing file, garbage, a non-effai JSON or an unreadable schema (newer: upgrade effai)."""
    path = Path(path)
    doc = _read_document(path)
    records = [record_from_dict(d, f"{path}: records[{i}]") for i, d in enumerate(doc["records"])]
    header = {k: v for k, v in doc.items() if k != "records"}
    if header.get("status") not in ("complete", "interrupted"):
        header["status"] = "interrupted"
        header["crashed"] = True
    return header, records


class ReportWriter:
    """Writes the report at `path`, whole and atomically, on creation and after every `append`.

    An existing effai bench report of the same schema at `path` is appended to (its records kept; `notice` says
    so, for the CLI to print); a file that is not an effai bench report is refused with a UsageError rather than
    overwritten. `finish("complete" | "interrupted")` sets the final status; without it (a crash) the file stays
    valid with status "running". Safe to call from a worker thread (one lock around each write)."""

    def __init__(self, path: Path | str, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = _jsonable(dict(meta))
        self.records: list[BenchRecord] = []
        self._raw: list[dict[str, Any]] = []   # previous records, written back as read (nothing lost in a re-parse)
        self._lock = threading.Lock()
        self.notice = ""
        now = _now()
        self._doc: dict[str, Any] = {"schema": REPORT_SCHEMA, "effai_version": _effai_version(), "created_at": now,
                                     "updated_at": now, "status": "running", "meta": self.meta, "sessions": []}
        if self.path.exists():
            old = _read_document(self.path, other="choose another --out")
            self._raw = list(old["records"])
            self._doc["created_at"] = old.get("created_at", now)
            self._doc["sessions"] = list(old.get("sessions") or [])
            self.notice = (f"appending to the existing report {self.path} "
                           f"({len(self._raw)} earlier record{'s' if len(self._raw) != 1 else ''} kept)")
        self._session = {"started_at": now, "meta": self.meta, "status": "running"}
        self._doc["sessions"].append(self._session)
        self._write()

    @property
    def appended(self) -> bool:
        """True when this writer continues a report an earlier run left at `path`."""
        return bool(self.notice)

    def append(self, rec: BenchRecord) -> None:
        """Add one record and rewrite the file (the previous version stays intact until os.replace)."""
        with self._lock:
            self.records.append(rec)
            self._raw.append(record_to_dict(rec))
            self._write_locked()

    def finish(self, status: str = "complete") -> Path:
        """Final status: "complete" or "interrupted" (Ctrl-C, a fatal runner error). Returns the report path."""
        if status not in ("complete", "interrupted"):
            raise ValueError(f"report status must be 'complete' or 'interrupted', not {status!r}")
        with self._lock:
            self._doc["status"] = status
            self._session["status"] = status
            self._session["finished_at"] = _now()
            self._write_locked()
        return self.path

    def _write(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        self._doc["updated_at"] = _now()
        doc = {**self._doc, "records": self._raw}
        try:
            atomic_write_text(self.path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write the bench report {self.path}: {e.strerror or e}; choose another --out "
                             "(a writable file)") from None


def check_writable(path: Path | str) -> None:
    """UsageError naming `path` unless a report can be written there: called before any device is touched or any
    timing starts. Probes with a temp file beside it (removed at once); a missing parent folder is created, as the
    writer would."""
    import os
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file path for the JSON report, like {path}/bench.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
        if path.exists() and not os.access(path, os.R_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UsageError(f"cannot write the bench report {path}: {e.strerror or e}; choose another --out "
                         "(a writable file)") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old report or the new one, never half of one (effai.files.atomic_write)."""
    atomic_write(path, text)


# ---------------------------------------------------------------------------------------------------- the table

def fmt_ms(v: Any) -> str:
    """Milliseconds with about three significant figures: 0.0123, 4.10, 41.2, 412."""
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def shorten(text: str, width: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def artifact_label(rec: BenchRecord) -> str:
    """'ghostnetv3_050.digits tflite int8'."""
    a = rec.artifact
    return " ".join(str(a.get(k) or "?") for k in ("model", "target", "precision"))


def record_label(rec: BenchRecord) -> str:
    """'ghostnetv3_050.digits tflite int8 @ host x2': the name of a BenchRecord.key() in tables, plots and diffs."""
    return f"{artifact_label(rec)} @ {rec.device.get('name', '?')} x{rec.threads}"


def energy_text(energy: dict[str, Any], width: int = 36) -> str:
    """'12.3 mJ/inf 2.41 W' or 'unavailable: <reason>' shortened to `width`."""
    if energy and energy.get("available") and energy.get("joules_per_inference") is not None:
        j = energy["joules_per_inference"]
        text = f"{j * 1e3:.3g} mJ/inf" if abs(j) < 1 else f"{j:.3g} J/inf"
        if energy.get("mean_watts") is not None:
            text += f" {energy['mean_watts']:.3g} W"
        return text
    reason = (energy or {}).get("reason") or "no meter"
    reason = reason if reason.startswith("unavailable") else f"unavailable: {reason}"
    return shorten(reason, width)


def status_text(rec: BenchRecord) -> str:
    """'ok', 'ok (incomplete)' or 'error: <reason>' shortened."""
    extra = rec.extra if isinstance(rec.extra, dict) else {}
    incomplete = bool(extra.get("incomplete")) or extra.get("complete") is False
    if rec.status == "ok":
        return "ok (incomplete)" if incomplete else "ok"
    return shorten(f"{rec.status}: {rec.error}" if rec.error else rec.status, 40)


# Columns by value: at a narrow terminal the least valuable are hidden first (rich would otherwise fold every cell
# into a few characters a line); the caption names what was hidden (every field is in the JSON report).
_PRIORITY = ("artifact", "median ms", "thr", "device", "status", "p90", "energy", "first", "load", "p99", "runtime",
             "runs", "throttling")
_COLUMNS = (("artifact", "left"), ("device", "left"), ("thr", "right"), ("runtime", "left"), ("runs", "right"),
            ("median ms", "right"), ("p90", "right"), ("p99", "right"), ("first", "right"), ("load", "right"),
            ("energy", "left"), ("throttling", "left"), ("status", "left"))


def table(records: list[BenchRecord], title: str | None = "effai bench", width: int | None = None) -> Any:
    """A rich Table, one row per record: artifact, threads, runtime, runs, median/p90/p99/first/load (ms), energy,
    throttling verdict (with drift), status. Columns that would say the same thing on every row move to the caption
    (one device; energy unavailable everywhere for one reason; every status ok). With `width` (the terminal's), the
    columns that do not fit whole are hidden in _PRIORITY order, least valuable first, and the caption says which."""
    from rich.table import Table

    devices = {str(r.device.get("name", "?")) for r in records}
    energies = {energy_text(r.energy) for r in records if not (r.energy or {}).get("available")}
    any_energy = any((r.energy or {}).get("available") for r in records)
    any_failed = any(r.status != "ok" for r in records)
    caption = []
    if len(devices) == 1:
        caption.append(f"device {next(iter(devices))}")
    if not any_energy and records:
        caption.append("energy unavailable (reason below)" if len(energies) == 1 else "energy unavailable")
    drop = {"device"} if len(devices) == 1 else set()
    drop |= set() if any_energy else {"energy"}
    drop |= set() if any_failed else {"status"}
    rows = []
    for rec in records:
        s = rec.stats or {}
        th = rec.throttling or {}
        verdict = str(th.get("verdict", "unknown"))
        drift = th.get("drift")
        if isinstance(drift, (int, float)) and math.isfinite(drift):
            verdict += f" (drift {drift:.2f})"
        rows.append({"artifact": artifact_label(rec), "device": str(rec.device.get("name", "?")),
                     "thr": str(rec.threads), "runtime": f"{rec.runtime} {rec.runtime_version}".strip(),
                     "runs": str(rec.runs),
                     "median ms": fmt_ms(s.get("median")), "p90": fmt_ms(s.get("p90")), "p99": fmt_ms(s.get("p99")),
                     "first": fmt_ms(rec.first_ms), "load": fmt_ms(rec.load_ms), "energy": energy_text(rec.energy),
                     "throttling": verdict, "status": status_text(rec)})
    shown = [name for name, _ in _COLUMNS if name not in drop]
    if width is not None:
        keep, used = set(), 1                      # used: the table's left border
        for name in [c for c in _PRIORITY if c in shown]:
            need = max([len(name), *(len(r[name]) for r in rows)]) + 3     # padding 2 + separator 1
            if name == "artifact" or used + need <= width:
                keep.add(name)
                used += need
        hidden = [c for c in shown if c not in keep]
        if hidden:
            caption.append(f"hidden at this width: {', '.join(hidden)} (all in the JSON report)")
        shown = [c for c in shown if c in keep]
    t = Table(title=title, caption="; ".join(caption) or None, show_lines=False)
    for name, justify in _COLUMNS:
        if name in shown:
            t.add_column(name, justify=justify, overflow="fold")
    for cells in rows:
        t.add_row(*(cells[name] for name in shown))
    return t
