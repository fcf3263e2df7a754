"""MODEL_CARD.md: a bundle's human-readable card, generated from bundle.json, perf.json and the artifact manifests.

    card.write(root)      # after packing, and after `effai bench --record` appends to perf.json

The text is a pure function of those files (no clock, no host names beyond what perf.json records), so packing
twice gives the same bytes. torch-free: bench --record regenerates it on machines without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effai.bundle import index as bundle_index
from effai.errors import EffaiError, UsageError
from effai.files import atomic_write, read_json

CARD = "MODEL_CARD.md"
PERF = "perf.json"
LABELS = "labels.txt"
PREPROCESSING = "preprocessing.json"

MAC_CONVENTION = ("1 MAC = one multiply-add; counted with forward hooks over every Conv2d and Linear layer of the "
                  "deploy (re-parameterized) form at batch 1 and the card's input size: Conv2d = output elements x "
                  "(in_channels / groups) x kernel_h x kernel_w, Linear = output elements x in_features; "
                  "normalization, activations, pooling, additions and matrix products outside Linear layers "
                  "(attention scores) are not counted")

# What each format carries inside the artifact, readable by its own tooling (effai export writes it; issue 6).
NATIVE_METADATA = {
    "coreml": "inside the .mlpackage: author, license, version and short description, `userDefined` metadata with "
              "the preprocessing (mean, std, scale, channel order, input size, layout, interpolation), and class "
              "labels when the model is a classifier; Xcode's model view or coremltools `MLModel(path).get_spec()`",
    "tflite": "TFLite Metadata (`TFLITE_METADATA`): name, description, version, author, license, input normalization "
              "(mean/std) and image properties, and labels.txt as an associated file (TENSOR_AXIS_LABELS) zipped onto "
              "the model; Android Studio's ML model binding and the tflite-support metadata reader show them",
    "onnx": "`metadata_props` key/values (effai model, labels, preprocessing, weights sha256, license, author); "
            "`onnx.load(path).metadata_props` or onnxruntime `session.get_modelmeta().custom_metadata_map`",
    "executorch": "a .pte has no metadata section apps read: the sidecar JSON is the artifact's manifest.json (model, "
                  "labels, preprocessing, parity) together with the bundle's preprocessing.json and labels.txt",
}


def preprocessing_doc(preprocessing: dict[str, Any], inputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """preprocessing.json: the card's preprocessing block plus how to apply it (the app-side recipe in words)."""
    h, w = preprocessing["input_size"]
    c = preprocessing["channels"]
    mean, std = preprocessing["mean"], preprocessing["std"]
    gray = c == 1
    decode = ("RGB, then convert to one gray channel: luma = 0.299 R + 0.587 G + 0.114 B" if gray
              else f"{preprocessing['channel_order']} (3 channels)")
    resized = round(min(h, w) / preprocessing["crop_pct"])
    steps = [
        f"decode the image to {decode}",
        f"resize the shorter side to round({min(h, w)} / crop_pct) = {resized} pixels "
        f"with {preprocessing['interpolation']} interpolation, then centre-crop {h}x{w}",
        f"scale pixels to [0, 1] (multiply by {preprocessing['scale']:.10g}), then per channel "
        f"x = (x - mean) / std with mean {mean} and std {std}",
        f"lay the tensor out as {preprocessing['layout']} float32, shape [1, {c}, {h}, {w}] (batch 1)",
        "run the model; the output is one row of logits per image, one per line of labels.txt: "
        "argmax = the class, softmax = probabilities",
    ]
    doc = {**preprocessing, "labels": LABELS, "how_to": steps}
    if inputs:
        doc["inputs"] = inputs
    return doc


def write(root: Path) -> str:
    """Render MODEL_CARD.md for the bundle at root and write it atomically; returns the text."""
    text = render(root)
    atomic_write(Path(root) / CARD, text)
    return text


def render(root: Path) -> str:
    """The card's Markdown from bundle.json (+ perf.json and each artifact's manifest.json when present).
    Those files may have been edited by hand: a field of the wrong type is a UsageError naming the bundle."""
    root = Path(root)
    index = bundle_index.read(root)
    try:
        return _render(root, index)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise UsageError(f"cannot write {root / CARD}: a manifest.json, perf.json or preprocessing.json in {root} has "
                         f"a field of the wrong type ({type(e).__name__}: {str(e)[:120]}); re-pack the bundle"
                         ) from None


def _render(root: Path, index: dict[str, Any]) -> str:
    manifests = {a["dir"]: _manifest(root, a["dir"]) for a in index.get("artifacts", [])}
    m = index["model"]
    out: list[str] = [f"# {m['name']}", ""]
    if m.get("description"):
        out += [m["description"], ""]
    out += [f"Generated by effai {index.get('effai_version', '?')} from `bundle.json`, `perf.json` and the artifact "
            "manifests (`effai bundle pack`; `effai bench --record` regenerates it). Do not edit by hand: "
            "`effai bundle verify` checks every file's sha256.", ""]
    out += _status(index)
    out += _architecture(m)
    out += _weights(m)
    out += _training(m.get("trained"))
    out += _io(root, index, manifests)
    out += _accuracy(index)
    out += _artifacts(index)
    out += _native(index, manifests)
    out += _perf(root, index)
    out += _reproducibility(index)
    out += _verify(root, index)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def perf_rows(root: Path) -> list[dict[str, Any]]:
    """The rows of perf.json ([] when absent or unreadable as rows): {"rows": [...]}, {"records": [...]} or [...]."""
    path = Path(root) / PERF
    if not path.is_file():
        return []
    try:
        doc = read_json(path)
    except EffaiError:
        return []
    if isinstance(doc, dict):
        doc = doc.get("rows") or doc.get("records") or []
    rows = doc if isinstance(doc, list) else []
    return [r for r in rows if isinstance(r, dict)]


def _manifest(root: Path, rel: str) -> dict[str, Any] | None:
    try:
        doc = read_json(root / rel / "manifest.json")
    except EffaiError:
        return None
    return doc if isinstance(doc, dict) else None


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _pct(x: Any) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) else "-"


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f} {unit} ({int(n):,})"
    return f"{int(n):,}"


def _status(index: dict[str, Any]) -> list[str]:
    arts = index.get("artifacts", [])
    bad = [a for a in arts if a.get("status") in ("export-failed", "fail")]
    line = f"**Bundle status: {index.get('status', '?')}** - {len(arts)} artifact(s)"
    counts: dict[str, int] = {}
    for a in arts:
        counts[a.get("status", "?")] = counts.get(a.get("status", "?"), 0) + 1
    if counts:
        line += ": " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    out = ["## Status", "", line + ".", ""]
    for a in bad:
        what = ("export failed" if a["status"] == "export-failed" else
                "exported but FAILED its parity/accuracy gate: do not ship it")
        out.append(f"- **{a['target']} {a['precision']}**: {what}" + (f": {a['error']}" if a.get("error") else ""))
    for s in index.get("skipped", []):
        out.append(f"- {s['target']} {s['precision']}: not built ({s['reason']})")
    if bad or index.get("skipped"):
        out.append("")
    return out


def _architecture(m: dict[str, Any]) -> list[str]:
    c, h, w = m["input_size"]
    rows = [["family", m.get("family", "-")], ["task", m.get("task", "-")],
            ["parameters", _count(m.get("params"))], ["MACs", _count(m.get("macs")) + f" at {c}x{h}x{w}"],
            ["input", f"{c}x{h}x{w} (C x H x W), batch 1"], ["classes", m.get("num_classes", "-")]]
    return ["## Architecture", "", *_table(["", ""], rows),
            f"Parameters and MACs are of the deploy form effai exports (training-time branches re-parameterized). "
            f"{MAC_CONVENTION}.", ""]


def _weights(m: dict[str, Any]) -> list[str]:
    wts = m.get("weights", {})
    rows = [["source", wts.get("source", "-")], ["availability", wts.get("available", "-")],
            ["sha256", f"`{wts.get('sha256', '-')}`"], ["license", m.get("license", "-")]]
    out = ["## Weights", "", *_table(["", ""], rows)]
    if wts.get("available") == "random-init":
        out += ["**These weights are random-init: outputs are meaningless for real images.**", ""]
    return out


def _training(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return ["## Training", "", "Not trained by effai: see the weights source above for the original recipe "
                "and data.", ""]
    labels = {"recipe": "recipe", "data": "data", "teacher": "teacher (knowledge distillation)", "loss": "loss",
              "epochs": "epochs", "held_out_top1": "held-out top-1", "folded": "folded after training"}
    order = [*labels, *sorted(k for k in t if k not in labels)]
    rows = [[labels.get(k, k), _pct(t[k]) if k == "held_out_top1" else t[k]] for k in order if t.get(k) is not None]
    return ["## Training", "", "Trained by effai (`effai train`); the record rides in the weights file's metadata.",
            "", *_table(["", ""], rows)]


def _io(root: Path, index: dict[str, Any], manifests: dict[str, Any]) -> list[str]:
    m = index["model"]
    manifest = next((x for x in manifests.values() if x), None)
    out = ["## Inputs, outputs and preprocessing", ""]
    if manifest:
        for kind in ("inputs", "outputs"):
            for t in manifest.get(kind, []):
                out.append(f"- {kind[:-1]} `{t['name']}`: {t.get('dtype', 'float32')} "
                           f"[{', '.join(map(str, t['shape']))}] {t.get('layout', '')}".rstrip())
    out.append(f"- labels: `{LABELS}`, {m.get('num_classes', '?')} classes, one per line in output order")
    out.append(f"- preprocessing: `{PREPROCESSING}` (steps below)")
    out.append("")
    try:
        pre = read_json(root / PREPROCESSING)
    except EffaiError:
        pre = {}
    pre = pre if isinstance(pre, dict) else {}
    for i, step in enumerate(pre.get("how_to", []), 1):
        out.append(f"{i}. {step}")
    if pre.get("how_to"):
        out.append("")
    return out


def _accuracy(index: dict[str, Any]) -> list[str]:
    rows = []
    data = set()
    for a in index.get("artifacts", []):
        acc = a.get("accuracy")
        if not acc:
            rows.append([a["target"], a["precision"], "-", "-", "-", "-", "-", "not measured"])
            continue
        data.add(str(acc.get("data")))
        art = acc.get("artifact") or {}
        torch = acc.get("torch") or {}
        drop = acc.get("drop_points")
        rows.append([a["target"], a["precision"], _pct(torch.get("top1")), _pct(torch.get("top5")),
                     _pct(art.get("top1")), _pct(art.get("top5")), "-" if drop is None else f"{drop:.2f}",
                     acc.get("status", "-") + (f" ({acc['reason']})" if acc.get("reason") else "")])
    out = ["## Accuracy per artifact", ""]
    if data:
        out += ["Top-1/top-5 of the torch fp32 model and of each artifact in its own runtime on "
                f"{', '.join(sorted(data))}; "
                "drop in percentage points; the gate fails an artifact that loses more than its max drop.", ""]
    return out + _table(["target", "precision", "torch top-1", "torch top-5", "artifact top-1", "artifact top-5",
                         "drop (points)", "gate"], rows)


def _parity_text(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    s = p.get("status", "-")
    if p.get("max_abs_err") is not None:
        s += f" (max abs err {p['max_abs_err']:.1e}, cos {p.get('cosine', 0):.6f}, {p.get('runtime', '?')})"
    elif p.get("reason"):
        s += f" ({p['reason']})"
    return s


def _artifacts(index: dict[str, Any]) -> list[str]:
    rows = []
    for a in index.get("artifacts", []):
        mb = f"{a['bytes'] / 1e6:.2f}" if a.get("bytes") else "-"
        rows.append([a["target"], a["precision"], f"`{a['model_file']}`" if a.get("model_file") else "-", mb,
                     a.get("status", "-"), _parity_text(a.get("parity"))])
    return ["## Artifacts", "", *_table(["target", "precision", "file", "MB", "status", "parity"], rows),
            "status: pass = parity (and the accuracy gate) checked in the target's runtime here; unverified = no "
            "runtime on the packing host (Core ML off macOS), structural check only; fail = kept but must not ship; "
            "export-failed = no artifact.", ""]


def _native(index: dict[str, Any], manifests: dict[str, Any]) -> list[str]:
    out = ["## Native metadata", ""]
    for a in index.get("artifacts", []):
        if a.get("status") == "export-failed":
            continue
        recorded = (manifests.get(a["dir"]) or {}).get("native_metadata")
        if isinstance(recorded, dict) and recorded.get("fields"):
            note = (f"{recorded.get('format', 'embedded')}, labels {recorded.get('labels', '?')}"
                    + (", Core ML classifier" if recorded.get("classifier") else "")
                    + f"; fields: {', '.join(map(str, recorded['fields']))}; read with "
                    + str(recorded.get("read_with") or NATIVE_METADATA.get(a["target"], "the format's own tools")))
        elif a["target"] == "executorch":
            note = NATIVE_METADATA["executorch"]
        else:
            note = ("none embedded (this artifact's manifest records no `native_metadata`); its manifest.json is "
                    "the sidecar with labels and preprocessing")
        out.append(f"- **{a['target']} {a['precision']}** ({a['dir']}/): {note}")
    return out + [""]


def _perf(root: Path, index: dict[str, Any]) -> list[str]:
    rows = perf_rows(root)
    out = ["## Performance", ""]
    if not rows:
        example = next((a["dir"] for a in index.get("artifacts", []) if a.get("status") != "export-failed"),
                       "<artifact>")
        return out + [f"No measurements yet: run `effai bench <bundle>/{example} --record <bundle>` "
                      "(any artifact dir; `--device adb:SERIAL` or `ssh:USER@HOST` for phones and boards).", ""]

    def key(r: dict[str, Any]) -> tuple:
        return tuple(str(r.get(k, "")) for k in ("device_class", "device", "target", "precision")) + (
            _number(r.get("threads")), _number(r.get("median_ms")), str(r.get("date", "")))

    table = []
    for r in sorted(rows, key=key):
        energy = r.get("energy_j")
        table.append([r.get("device_class", "-"), r.get("device", "-"),
                      f"{r.get('runtime', '-')} {r.get('runtime_version', '')}".strip(), r.get("target", "-"),
                      r.get("precision", "-"), r.get("threads", "-"), _ms(r.get("median_ms")), _ms(r.get("p90_ms")),
                      "-" if _finite(energy) is None else f"{_finite(energy):.4g}", r.get("effai_version", "-"),
                      r.get("date", "-")])
    return out + [f"{len(rows)} measurement(s) from `perf.json` (batch 1, latency per inference; energy in joules "
                  "per inference where a power meter was read).", "",
                  *_table(["device class", "device", "runtime", "target", "precision", "threads", "median ms",
                           "p90 ms", "energy J", "effai", "date"], table)]


def _finite(v: Any) -> float | None:
    """v as a float when it is a finite JSON number, else None (perf.json may have been edited)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if f == f and abs(f) != float("inf") else None


def _number(v: Any) -> float:
    """A sort key for a field that should be a number: anything else sorts as 0."""
    f = _finite(v)
    return 0.0 if f is None else f


def _ms(v: Any) -> str:
    f = _finite(v)
    return "-" if f is None else f"{f:.3f}"


def _reproducibility(index: dict[str, Any]) -> list[str]:
    d = index.get("deterministic") or {}
    out = ["## Reproducibility", ""]
    if d.get("note"):
        out += [d["note"], ""]
    varies = d.get("varies") or {}
    if varies:
        out.append("Files that are not bit-identical when packed twice:")
        out += [f"- `{p}`: {why}" for p, why in sorted(varies.items())]
        out.append("")
    if d.get("identical"):
        out += [f"{len(d['identical'])} file(s) are bit-identical when packed again from the same inputs with the same "
                "toolchain versions (listed in bundle.json `deterministic.identical`).", ""]
    return out


def _verify(root: Path, index: dict[str, Any]) -> list[str]:
    s = index.get("signing")
    s = s if isinstance(s, dict) or s is None else {}
    out = ["## Integrity", "", "`bundle.json` lists every file with its size and sha256. Check them with "
           "`effai bundle verify <bundle>`" + (" --pubkey KEY.pub" if s else "") + "."]
    if s:
        out.append(f"Signed with {s.get('algorithm', '?')}, key id `{s.get('key_id', '?')}` (`bundle.sig` holds the "
                   "signature over bundle.json's exact bytes).")
    else:
        out.append("Not signed (`effai bundle pack --sign KEY` signs it).")
    return out + [""]
