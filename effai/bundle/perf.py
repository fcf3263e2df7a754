"""perf.json: measured latency (and energy) of a bundle's artifacts per device, appended by `effai bench --record`.

Schema `effai.perf/1`, one row per measurement, never the device's address. A record belongs to the artifact whose
manifest.json has its manifest_sha256 ("match": "manifest"), else to the same model, target and precision.
Row fields, matching and device classes: docs/bundle.md, "effai/bundle/perf.py".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from effai.bundle import index as index_mod
from effai.bundle import sign
from effai.errors import EffaiError, UsageError
from effai.files import atomic_write, read_json, sha256

PERF = "perf.json"
SCHEMA = "effai.perf/1"
SCHEMA_VERSION = 1
CLASSES = ("phone", "board", "laptop", "desktop", "server")
ARM = ("aarch64", "arm64", "armv6l", "armv7l", "armv8l")

BOARD = re.compile(r"raspberry pi|jetson|\borin\b|xavier|rockchip|\brk3[0-9]{3}|radxa|\brock ?(pi|[0-9])|odroid|"
                   r"orange ?pi|banana ?pi|khadas|beagle|\bcoral\b|pine64|i\.?mx ?8", re.I)
LAPTOP = re.compile(r"macbook|thinkpad|latitude|\bxps\b|zenbook|vivobook|ideapad|\byoga\b|spectre|elitebook|"
                    r"probook|surface (laptop|pro|book)|laptop|notebook|chromebook", re.I)
SERVER = re.compile(r"xeon|epyc|opteron|neoverse|ampere|graviton|poweredge|proliant|supermicro|amazon ec2|"
                    r"google compute engine|openstack|\bkvm\b|qemu|virtual machine|vmware|hvm domu", re.I)


def device_class(device: dict[str, Any]) -> str:
    """phone | board | laptop | desktop | server for a BenchRecord's device description (rules in the module doc)."""
    explicit = device.get("device_class")
    if explicit in CLASSES:
        return str(explicit)
    name = str(device.get("name") or "")
    transport = str(device.get("transport") or (name.split(":", 1)[0] if ":" in name else "host"))
    model = " ".join(str(device.get(k) or "") for k in ("model", "soc"))
    os_name = str(device.get("os") or "")
    if transport == "adb" or os_name.lower().startswith("android"):
        return "phone"
    if BOARD.search(model):
        return "board"
    if LAPTOP.search(model):
        return "laptop"
    cores = device.get("cores")
    if SERVER.search(f"{model} {device.get('cpu') or ''}") or (isinstance(cores, int) and cores >= 32):
        return "server"
    if transport == "ssh" and str(device.get("machine") or "").lower() in ARM:
        return "board"
    return "desktop"


def describe_device(device: dict[str, Any]) -> str:
    """A readable, address-free device name: model (SoC or CPU)."""
    model = str(device.get("model") or "").strip()
    detail = str(device.get("soc") or device.get("cpu") or "").strip()
    if model and detail and detail.lower() not in model.lower():
        return f"{model} ({detail})"
    return model or detail or f"unknown {device_class(device)}"


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return round(f, 4) if math.isfinite(f) else None


# ------------------------------------------------------------------------------------------------- reading


def load_rows(root: Path) -> list[dict[str, Any]]:
    """The rows of root/perf.json ([] when the bundle has none); UsageError for garbage or a newer schema."""
    path = Path(root) / PERF
    if not path.is_file():
        return []
    doc = read_json(path, str(path))
    schema = doc.get("schema", "") if isinstance(doc, dict) else ""
    schema = schema if isinstance(schema, str) else ""
    m = re.fullmatch(r"effai\.perf/(\d+)", schema)
    if not m or not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise UsageError(f"{path} is not an effai perf table (schema {schema[:80]!r}); restore it from the bundle's "
                         "source")
    if int(m.group(1)) > SCHEMA_VERSION:
        raise UsageError(f"{path} was written by a newer effai ({schema}; this effai reads {SCHEMA}); upgrade "
                         "effai: pip install -U effai")
    return [r for r in doc["rows"] if isinstance(r, dict)]


def best_latency(root: Path) -> dict[str, dict[str, Any]]:
    """The fastest measured median per device class: {class: {median_ms, p90_ms, device, target, precision, threads,
    runtime, date}}, classes in CLASSES order; {} when nothing was measured."""
    best: dict[str, dict[str, Any]] = {}
    for r in load_rows(root):
        cls, median = r.get("device_class"), _num(r.get("median_ms"))
        if not isinstance(cls, str) or median is None:
            continue
        if cls not in best or median < best[cls]["median_ms"]:
            best[str(cls)] = {"median_ms": median, "p90_ms": _num(r.get("p90_ms")), "device": r.get("device"),
                              "target": r.get("target"), "precision": r.get("precision"),
                              "threads": r.get("threads"), "runtime": r.get("runtime"), "date": r.get("date")}
    order = {c: i for i, c in enumerate(CLASSES)}
    return dict(sorted(best.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# ------------------------------------------------------------------------------------------------ recording


@dataclass(frozen=True)
class RecordResult:
    """What `record` did: rows added (duplicates and failed measurements are not), the table's size, and what
    happened to the signature ("re-signed", "dropped": a now-stale bundle.sig was removed, "unsigned",
    "unchanged": nothing was added so nothing was rewritten)."""

    added: int
    rows: int
    duplicates: int
    skipped: list[str]
    signature: str
    perf: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _artifact_keys(root: Path, index: dict[str, Any]) -> list[tuple[dict[str, Any], str | None, str | None]]:
    """(artifact entry, sha256 of its manifest.json, the manifest's model name) for each artifact with a manifest."""
    out = []
    for a in index.get("artifacts", []):
        if not isinstance(a, dict) or a.get("status") == "export-failed":
            continue
        mpath = root / str(a.get("dir", "")) / "manifest.json"
        digest = name = None
        if a.get("dir") and mpath.is_file():
            digest = sha256(mpath)
            try:
                doc = read_json(mpath)
            except EffaiError:
                doc = None
            model = doc.get("model") if isinstance(doc, dict) else None
            name = model.get("name") if isinstance(model, dict) else model
            name = name if isinstance(name, str) else None
        out.append((a, digest, name))
    return out


def match(root: Path, index: dict[str, Any], rec: Any) -> tuple[dict[str, Any], str]:
    """(the bundle's artifact entry, how it matched) for a BenchRecord; UsageError naming the artifacts if none."""
    arts = _artifact_keys(root, index)
    a = rec.artifact or {}
    for art, digest, _ in arts:
        if digest and a.get("manifest_sha256") == digest:
            return art, "manifest"
    bundle_model = (index.get("model") or {}).get("name")
    for art, _, name in arts:
        if (art.get("target"), art.get("precision")) == (a.get("target"), a.get("precision")) \
                and a.get("model") in {bundle_model, name} - {None}:
            return art, "model-target-precision"
    have = ", ".join(f"{x.get('target')}/{x.get('precision')} ({x.get('dir')})" for x, _, _ in arts) or "none"
    raise UsageError(f"the record for {a.get('model')} {a.get('target')}/{a.get('precision')} ({a.get('path')}) "
                     f"matches no artifact of bundle {root} ({bundle_model}); its artifacts: {have}. Bench one of "
                     f"them: effai bench {root}/<artifact dir> --record {root}")


def row(rec: Any, art: dict[str, Any], how: str) -> dict[str, Any]:
    """One perf.json row for a BenchRecord measured on the bundle artifact `art`."""
    dev = rec.device or {}
    name = str(dev.get("name") or "")
    energy = rec.energy or {}
    stats = rec.stats or {}
    return {"device": describe_device(dev), "device_class": device_class(dev),
            "transport": str(dev.get("transport") or (name.split(":", 1)[0] if ":" in name else "host")),
            "os": dev.get("os"), "runtime": rec.runtime, "runtime_version": rec.runtime_version,
            "target": art.get("target"), "precision": art.get("precision"), "artifact": art.get("dir"),
            "threads": int(rec.threads), "runs": int(rec.runs), "median_ms": _num(stats.get("median")),
            "p90_ms": _num(stats.get("p90")),
            "energy_j": _num(energy.get("joules_per_inference")) if energy.get("available") else None,
            "throttling": (rec.throttling or {}).get("verdict"), "effai_version": rec.effai_version,
            "date": str(rec.created_at or "")[:10] or None, "match": how}


def _refuse_tampered_signature(root: Path, index: dict[str, Any], prefix: str) -> Any:
    """Recording re-indexes (and re-signs or unsigns) the bundle, which would bless a change: refuse an invalid
    signature, and a removed one (bundle.json names a key, bundle.sig is gone)."""
    sig = sign.check_signature(root, index)
    if sig.state == "invalid":
        raise EffaiError(f"{prefix}bundle {root}: {'; '.join(sig.problems[:2])}; recording would re-index it: "
                         "restore or re-pack the bundle first")
    if sig.state == "removed":
        raise EffaiError(f"{prefix}bundle {root}: {sig.problems[0]}; recording would re-index it. Only if you packed "
                         "it yourself and an earlier command was interrupted: effai bundle sign BUNDLE --key KEY --force, "
                         "then record again")
    return sig


def precheck(root: Path, artifacts: list[Any], sign_key: Path | None = None) -> None:
    """Everything `record` would refuse, checked before any device time is spent (`effai bench --record`): the
    bundle reads and matches its index, its signature is not invalid or removed, the key loads, and every artifact to be
    measured (an artifact.Artifact: `.describe()` gives model/target/precision/manifest_sha256) belongs to it."""
    from types import SimpleNamespace

    from effai.bundle import sign

    root = Path(root)
    index = index_mod.read(root)
    problems = index_mod.check(root, index)
    if problems:
        raise EffaiError(f"--record {root}: the bundle does not match its bundle.json ({'; '.join(problems[:3])}); "
                         "restore or re-pack it before measuring")
    _refuse_tampered_signature(root, index, "--record: ")
    if sign_key is not None:
        sign.load_private(sign_key)
    for art in artifacts:
        match(root, index, SimpleNamespace(artifact=art.describe()))


def record(root: Path, records: list[Any], sign_key: Path | None = None) -> RecordResult:
    """Append the ok BenchRecords to root/perf.json, regenerate MODEL_CARD.md and bundle.json, and re-sign with
    `sign_key` or drop the now-stale signature (bundle.json changes, so an old bundle.sig would no longer match).

    Refused (nothing written): a bundle whose files do not match its index or whose signature is invalid or removed
    (re-indexing would bless the change), a record for an artifact not in the bundle, a bad key."""
    root = Path(root)
    index = index_mod.read(root)
    if sign_key is not None:
        sign.load_private(sign_key)
    problems = index_mod.check(root, index)
    if problems:
        raise EffaiError(f"bundle {root} does not match its bundle.json ({'; '.join(problems[:3])}); recording would "
                         "re-index the changed files: restore or re-pack the bundle first")
    earlier = _refuse_tampered_signature(root, index, "")
    ok = [r for r in records if getattr(r, "status", "ok") == "ok"]
    skipped = [f"{r.artifact.get('target')}/{r.artifact.get('precision')} threads={r.threads}: {r.error}"
               for r in records if getattr(r, "status", "ok") != "ok"]
    new_rows = [row(r, *match(root, index, r)) for r in ok]
    rows = load_rows(root)
    added = []
    for r in new_rows:
        if r not in rows and r not in added:
            added.append(r)
    duplicates = len(new_rows) - len(added)
    if not added:
        return RecordResult(0, len(rows), duplicates, skipped, "unchanged", str(root / PERF))
    sig_path = root / index_mod.SIGNATURE
    had_signature = earlier.state == "valid"
    if sig_path.exists():
        sig_path.unlink()        # first: an interruption below leaves a "removed" signature (refused until
        #                          `bundle sign --force`), never a signature over the wrong bytes
    atomic_write(root / PERF, json.dumps({"schema": SCHEMA, "rows": rows + added}, indent=1, sort_keys=True,
                                         ensure_ascii=False) + "\n")
    index["signing"] = sign.public_block(sign_key) if sign_key is not None else None
    index, note = sign.reindex(root, index)
    notes = [note] if note else []
    if sign_key is not None:
        info = sign.sign(root, sign_key)
        state = "re-signed"
        if had_signature and earlier.key_id != info["key_id"]:
            notes.append(f"re-signed with key {info['key_id']}; it was signed by key {earlier.key_id}")
    else:
        state = "dropped" if had_signature else "unsigned"
        if had_signature:
            notes.append(f"the bundle is now unsigned: bundle.json changed, so the signature by key {earlier.key_id} "
                         f"was deleted and the signing block cleared; if you publish this bundle, sign it again: "
                         f"effai bundle sign {root} --key KEY (or record with --record-key KEY)")
    return RecordResult(len(added), len(rows) + len(added), duplicates, skipped, state, str(root / PERF), notes)
