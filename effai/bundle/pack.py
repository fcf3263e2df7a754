"""effai bundle pack: export one model to several targets/precisions and assemble an app-ready bundle.

    result = pack("ghostnetv3_050.digits", ["coreml", "tflite", "executorch", "onnx"], None, Path("bundles"))

Built in a temp dir beside `<out>/<model>`, renamed into place; the files are a function of the inputs except where
`VARIES` says otherwise (docs/bundle.md, "Determinism"). Also measures models (params, MACs) for the card.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from effai.version import __version__
from effai.bundle import model_card_md as card_mod
from effai.bundle import index as index_mod
from effai.errors import EffaiError, UsageError
from effai.export.stats import model_stats
from effai.files import atomic_write, read_json, replace_dir, staging_dir

TASK = "image-classification"      # the task bundles hold (single-forward classifiers); ModelCard.task per card
ARTIFACT_STATUSES = index_mod.ARTIFACT_STATUSES

# Measured by packing twice (tests/test_bundle_pack.py re-checks every "identical" claim; docs/bundle.md).
VARIES = {
    "coreml": {"model.mlpackage/Data/com.apple.CoreML/model.mlmodel":
               "coremltools records the conversion date (day resolution) in the spec's user-defined metadata: "
               "identical within one day; set SOURCE_DATE_EPOCH to pin it"},
}

Progress = Callable[[str, str, str, float], None]


@dataclass(frozen=True)
class PackResult:
    root: Path                                   # <out>/<model>
    index: dict[str, Any]                        # bundle.json as written
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.index["status"]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [a for a in self.index["artifacts"] if a["status"] in ("export-failed", "fail")]


# ------------------------------------------------------------------------------------------------ the plan


def plan(targets: Sequence[str],
         precisions: Sequence[str] | None) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(target, precision) pairs to build, and the skipped ones with the reason. No precisions: each target's
    default (fp16 for Core ML, fp32 elsewhere). A precision a target does not take is skipped, not an error."""
    from effai.export.plan import plan as plan_one
    from effai.export.targets import TARGETS

    targets = list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    if not targets:
        raise UsageError(f"--targets is empty; choose from: {', '.join(TARGETS.names())}")
    precs = list(dict.fromkeys(p.strip() for p in (precisions or []) if p.strip()))
    plans = [plan_one(t, p) for t in targets for p in (precs or [None])]   # unknown names: UsageError
    pairs = [(p.target, p.precision) for p in plans if p.ok]
    skipped = [{"target": p.target, "precision": p.precision, "reason": p.reason} for p in plans if not p.ok]
    if not pairs:
        raise UsageError("no target takes any of the precisions asked for (" + "; ".join(s["reason"] for s in skipped)
                         + "); choose precisions the targets list in `effai doctor`")
    return pairs, skipped


def destination(out: Path, name: str) -> Path:
    """<out>/<model>; UsageError when something that is not an effai bundle is already there."""
    from effai.export.artifact_dir import safe_name

    dest = Path(out) / safe_name(name)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"refusing to replace {dest}: it is a file, not a bundle; choose another --out")
    if dest.is_dir() and any(dest.iterdir()) and not is_bundle(dest):
        raise UsageError(f"refusing to replace {dest}: it is not empty and not an effai bundle (no {index_mod.INDEX} "
                         f"with schema {index_mod.SCHEMA}); choose another --out or move it away")
    return dest


def is_bundle(path: Path) -> bool:
    """Whether path holds a bundle.json with an effai.bundle/ schema (however damaged the rest of it is)."""
    try:
        doc = read_json(Path(path) / index_mod.INDEX)
    except EffaiError:
        return False
    schema = doc.get("schema") if isinstance(doc, dict) else None
    return isinstance(schema, str) and schema.startswith("effai.bundle/")


# ------------------------------------------------------------------------------------------------ packing


def pack(model: str, targets: Sequence[str], precisions: Sequence[str] | None = None, out: Path = Path("bundles"),
         sign_key: Path | None = None, *, eval: str = "auto", weights: Path | None = None, pretrained: bool = False,
         max_drop: float = 1.0, progress: Callable[[str], Progress | None] | None = None,
         on_artifact: Callable[[dict[str, Any]], None] | None = None) -> PackResult:
    """Export `model` to every target x precision and write the bundle <out>/<model>/ (see the module doc).

    An export that fails is recorded (status "export-failed" and its one-line error) and the others are still
    packed: the bundle's status is then "partial". An artifact that fails its parity/accuracy gate is packed with
    status "fail" (flagged in the card and the index) and also makes the bundle partial. When every export fails
    nothing is written and the (first) error is raised. `progress(dir)` returns
    the export progress callback for one artifact dir; `on_artifact` hears each bundle.json artifact entry."""
    from effai import zoo
    from effai.export.pipeline import ExportConfig, try_export
    from effai.zoo.catalog import CARDS

    if model in CARDS:                                   # before minutes of loading and exporting
        check_task(CARDS.get(model))
    pairs, skipped = plan(targets, precisions)
    sign_block = None
    if sign_key is not None:
        from effai.bundle import sign as sign_mod

        sign_mod.load_private(Path(sign_key))            # a missing or wrong key fails before minutes of exports
        sign_block = sign_mod.public_block(Path(sign_key))
    loaded = zoo.create(model, weights=weights, pretrained=pretrained)
    check_task(loaded.card)
    dest = destination(Path(out), loaded.card.name)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(dest)
    except OSError as e:
        raise UsageError(f"cannot create the bundle directory {dest}: {e.strerror}; choose a writable --out") from e
    try:
        artifacts: list[dict[str, Any]] = []
        errors: list[EffaiError] = []
        for target, precision in pairs:
            rel = f"{target}-{precision}"
            cfg = ExportConfig(target=target, precision=precision, out=tmp / rel, eval=eval, max_drop=max_drop)
            entry: dict[str, Any] = {"target": target, "precision": precision, "dir": rel}
            o = try_export(loaded, cfg, progress=progress(rel) if progress else None)
            if o.result is not None:
                entry["manifest"] = o.result.manifest
            if o.error is not None:
                entry["error"] = _one_line(o.error)
                if o.result is None:
                    errors.append(o.error)
            if "manifest" in entry:
                entry["manifest"] = normalize_artifact(tmp / rel, rel, loaded.card.bundled_weights)
            artifacts.append(_artifact_entry(tmp, entry))
            if on_artifact:
                on_artifact(artifacts[-1])
        if all(a["status"] == "export-failed" for a in artifacts):   # nothing to ship: no bundle, the first error
            raise errors[0] if len(errors) == 1 or isinstance(errors[0], UsageError) else EffaiError(
                "every export failed, nothing was packed: " + "; ".join(f"{a['dir']}: {a['error']}" for a in artifacts))
        carry_perf(dest, tmp, artifacts)     # measured rows of unchanged artifacts survive a re-pack
        index = _write_bundle(tmp, loaded, artifacts, skipped, sign_block)
        if sign_key is not None:
            from effai.bundle import sign as sign_mod

            sign_mod.sign(tmp, Path(sign_key))
        _commit(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackResult(dest, index, skipped)


def check_task(card: Any) -> None:
    """Bundles hold single-forward classifiers; a generative card (visual-question-answering,
    image-to-image-in-context) exports elsewhere."""
    if card.task == "image-to-image-in-context":
        raise UsageError(f"{card.name} is an {card.task} model: bundles hold {TASK} models only; export it with "
                         f"`effai delvm export {card.name} --out DIR`")
    if card.task == "image-super-resolution":
        raise UsageError(f"{card.name} is an {card.task} model: bundles hold {TASK} models only; export it with "
                         f"`effai sr export {card.name} --target T -o DIR`")
    if card.task != TASK:
        raise UsageError(f"{card.name} is a {card.task} model: bundles hold {TASK} models only; export it with "
                         f"`effai generate-export {card.name} --out DIR` (or `effai export {card.name} --target "
                         "executorch`)")


def carry_perf(old: Path, new: Path, artifacts: list[dict[str, Any]]) -> int:
    """Re-packing over a bundle keeps its measured perf.json rows (hours of phone runs) for the artifacts whose
    model file is byte-identical in the new pack; rows of changed or dropped artifacts are left behind, since they
    measured other bytes. Returns the rows kept (0 when there is no earlier bundle or perf table)."""
    from effai.bundle import perf

    if not is_bundle(old) or not (old / perf.PERF).is_file():
        return 0
    try:
        old_files = {f["path"]: f["sha256"] for f in index_mod.read(old).get("files", [])}
        rows = perf.load_rows(old)
    except EffaiError:
        return 0            # an unreadable old bundle is replaced; its table cannot be trusted anyway
    new_files = {e["path"]: e["sha256"] for e in index_mod.file_entries(new)}
    same = set()
    for a in artifacts:
        mf = a.get("model_file")
        parts = {p: h for p, h in new_files.items() if mf and (p == mf or p.startswith(mf + "/"))}
        if parts and all(old_files.get(p) == h for p, h in parts.items()):
            same.add(a["dir"])
    kept = [r for r in rows if r.get("artifact") in same]
    if kept:
        atomic_write(new / perf.PERF, json.dumps({"schema": perf.SCHEMA, "rows": kept}, indent=1, sort_keys=True,
                                                 ensure_ascii=False) + "\n")
    return len(kept)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]


def _artifact_entry(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """The bundle.json `artifacts` item for one export (its manifest, or its error)."""
    m = entry.get("manifest")
    rel = entry["dir"]
    if m is None:
        return {"target": entry["target"], "precision": entry["precision"], "dir": rel, "model_file": None,
                "status": "export-failed", "error": entry.get("error"), "parity": None, "accuracy": None, "bytes": 0}
    p = m.get("parity") or {}
    parity = {k: p[k] for k in ("status", "max_abs_err", "rel_err", "cosine", "top1_agreement", "runtime",
                                "runtime_version", "reason") if p.get(k) is not None}
    a = m.get("accuracy")
    accuracy = None if not a else {
        "data": a.get("data"), "samples": a.get("samples"), "torch": a.get("torch"), "artifact": a.get("artifact"),
        "drop_points": a.get("drop_points"), "max_drop_points": a.get("max_drop_points"), "status": a.get("status"),
        **({"reason": a["reason"]} if a.get("reason") else {})}
    model_file = f"{rel}/{m['model_file']}"
    size = sum(f["bytes"] for f in m.get("files", [])
               if f["path"] == m["model_file"] or f["path"].startswith(m["model_file"] + "/"))
    status = m.get("status", "unverified")
    return {"target": entry["target"], "precision": entry["precision"], "dir": rel, "model_file": model_file,
            "status": status if status in ARTIFACT_STATUSES else "unverified",
            "error": entry.get("error") if status == "fail" else None, "parity": parity, "accuracy": accuracy,
            "bytes": size}


def _write_bundle(root: Path, loaded: Any, artifacts: list[dict[str, Any]], skipped: list[dict[str, str]],
                  sign_block: dict[str, Any] | None) -> dict[str, Any]:
    card = loaded.card
    labels = _labels(loaded, root, artifacts)
    atomic_write(root / card_mod.LABELS, "".join(f"{x}\n" for x in labels))
    first = next((json.loads((root / a["dir"] / "manifest.json").read_text()) for a in artifacts
                  if a["status"] != "export-failed"), None)
    pre = card_mod.preprocessing_doc(card.preprocessing(), first.get("inputs") if first else None)
    atomic_write(root / card_mod.PREPROCESSING, json.dumps(pre, indent=1, sort_keys=True) + "\n")
    stats = model_stats(loaded.model, tuple(card.input_size))
    status = "complete" if all(a["status"] in ("pass", "unverified") for a in artifacts) else "partial"
    index: dict[str, Any] = {
        "schema": index_mod.SCHEMA,
        "effai_version": __version__,
        "model": {"name": card.name, "family": card.family, "task": card.task, "params": stats["params"],
                  "macs": stats["macs"], "input_size": list(card.input_size), "num_classes": len(labels),
                  "license": card.weights_license, "weights": weights_block(loaded),
                  "description": card.description, "trained": trained_block(card)},
        "artifacts": artifacts,
        "skipped": skipped,
        "status": status,
        "deterministic": determinism(root, artifacts),
        "signing": sign_block,
        "macs_convention": card_mod.MAC_CONVENTION,
    }
    index_mod.write(root, index)           # the card reads bundle.json ...
    card_mod.write(root)
    return index_mod.write(root, index)    # ... and bundle.json lists the card


def _labels(loaded: Any, root: Path, artifacts: list[dict[str, Any]]) -> list[str]:
    for a in artifacts:
        if a["status"] != "export-failed":
            labels = json.loads((root / a["dir"] / "manifest.json").read_text()).get("labels")
            if labels:
                return [str(x) for x in labels]
    from effai import zoo

    return [str(x) for x in zoo.labels(loaded.card)] or [f"class_{i}" for i in range(loaded.card.num_classes)]


def weights_block(loaded: Any) -> dict[str, Any]:
    """Where the weights came from, independent of where effai is installed."""
    card, w = loaded.card, loaded.weights
    if loaded.random_init:
        return {"source": "random-init", "sha256": None, "available": "random-init"}
    if card.bundled_weights and Path(w.source).name == card.bundled_weights:
        return {"source": f"bundled:{card.bundled_weights}", "sha256": w.sha256, "available": "bundled"}
    if w.source.startswith("timm-hub:"):
        return {"source": w.source, "sha256": w.sha256, "available": "hub"}
    return {"source": Path(w.source).name, "sha256": w.sha256, "available": "user"}


def trained_block(card: Any) -> dict[str, Any] | None:
    """effai's own training record (card.extra['train_record'], from the weights' metadata), as `zoo show` gives it."""
    record = card.extra.get("train_record")
    if not record:
        return None
    cfg = record.get("config", {})
    return {"recipe": record.get("recipe"), "data": cfg.get("data"), "teacher": cfg.get("teacher"),
            "loss": cfg.get("loss"), "epochs": record.get("epochs"), "held_out_top1": record.get("val_acc"),
            "folded": record.get("folded")}


def _commit(tmp: Path, dest: Path) -> None:
    """Move the finished bundle into place; a previous bundle is replaced only once the new one is complete."""
    if dest.exists() and any(dest.iterdir()) and not is_bundle(dest):   # appeared while packing: never replaced
        raise UsageError(f"refusing to replace {dest}: it is not an effai bundle; choose another --out")
    replace_dir(tmp, dest)


# ------------------------------------------------------------------------------------------------ determinism


def source_date() -> datetime | None:
    """SOURCE_DATE_EPOCH (reproducible-builds.org) as a UTC time, None when unset; UsageError when malformed."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or not raw.strip():
        return None
    try:
        return datetime.fromtimestamp(int(raw.strip()), tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} must be a Unix time in seconds, like 1764460800") from None


def normalize_artifact(art: Path, rel: str, bundled: str | None = None) -> dict[str, Any]:
    """Make the bundle copy of one artifact dir a function of its inputs (see the module doc); returns its manifest."""
    from effai.export import manifest as manifest_io

    log = art / manifest_io.LOG
    if log.exists():
        log.unlink()
    m = manifest_io.read(art)
    if m.get("target") == "coreml":
        _normalize_mlpackage(art / m["model_file"])
    when = source_date()
    m.pop("timings_s", None)
    m.pop("created_at", None)
    if when is not None:
        m["created_at"] = when.isoformat(timespec="seconds")
    if isinstance(m.get("export_config"), dict):
        m["export_config"]["out"] = rel
    model = m.get("model") or {}
    if bundled and isinstance(model.get("weights"), str) and Path(model["weights"]).name == bundled:
        model["weights"] = f"bundled:{bundled}"      # not effai's install path
    m["bundle_copy"] = ("normalized by effai zoo pack: created_at " + ("from SOURCE_DATE_EPOCH" if when else
                        "left out (set SOURCE_DATE_EPOCH to record one)") + ", timings_s and export.log left out, "
                        "export_config.out relative to the bundle" + (", Core ML spec re-serialized deterministically"
                                                                      if m.get("target") == "coreml" else ""))
    m.pop("schema", None)
    m.pop("files", None)
    return manifest_io.write(art, m)


def _normalize_mlpackage(pkg: Path) -> None:
    """Canonical bytes for a .mlpackage: deterministic protobuf serialization, name-based item UUIDs, and
    coremltools' conversion_date from SOURCE_DATE_EPOCH when set. The spec's content is unchanged otherwise."""
    if not pkg.is_dir():
        return
    manifest_path = pkg / "Manifest.json"
    if manifest_path.is_file():
        doc = json.loads(manifest_path.read_text())
        entries = doc.get("itemInfoEntries") or {}
        renamed = {k: str(uuid.uuid5(uuid.NAMESPACE_URL, "effai-mlpackage:" + str(v.get("path", k))))
                   for k, v in entries.items()}
        doc["itemInfoEntries"] = {renamed[k]: v for k, v in entries.items()}
        if doc.get("rootModelIdentifier") in renamed:
            doc["rootModelIdentifier"] = renamed[doc["rootModelIdentifier"]]
        atomic_write(manifest_path, json.dumps(doc, indent=4, sort_keys=True))
    spec_path = next(iter(sorted(pkg.glob("Data/*/model.mlmodel"))), None)
    if spec_path is None:
        return
    try:
        from coremltools.proto import Model_pb2
    except ImportError:          # no coremltools here: leave the bytes as the exporter wrote them
        return
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    when = source_date()
    meta = spec.description.metadata.userDefined
    if when is not None and "com.github.apple.coremltools.conversion_date" in meta:
        meta["com.github.apple.coremltools.conversion_date"] = when.strftime("%Y-%m-%d")
    atomic_write(spec_path, spec.SerializeToString(deterministic=True))


def determinism(root: Path, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """bundle.json's `deterministic` block: which files come out bit-identical when packed again from the same
    inputs with the same toolchain versions, and which do not and why (measured: docs/bundle.md)."""
    varies: dict[str, str] = {}
    pinned = source_date() is not None
    for a in artifacts:
        for rel, why in VARIES.get(a["target"], {}).items():
            path = f"{a['dir']}/{rel}"
            if (root / path).exists() and not (pinned and "SOURCE_DATE_EPOCH" in why):
                varies[path] = why
    files = [e["path"] for e in index_mod.file_entries(root)] + [card_mod.CARD]
    identical = sorted(p for p in dict.fromkeys(files) if p not in varies)
    return {"identical": identical, "varies": varies,
            "note": "Packing again from the same model, weights, options and toolchain versions gives these files "
                    "bit-identical (bundle.json too when nothing varies). effai leaves wall-clock times out of the "
                    "bundle (SOURCE_DATE_EPOCH sets manifest created_at when wanted) and does not copy export.log. "
                    "Different toolchain versions or CPUs may produce different model bytes; parity and accuracy "
                    "are re-checked on every export."}
