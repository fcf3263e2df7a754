"""`effai verify DIR`: re-check an artifact's hashes and re-run its parity check from what the directory stores.

The parity inputs are rebuilt from parity.npz (the preprocessed photos as uint8) and the manifest (preprocessing,
noise seed); the torch reference outputs are stored there too, so no torch model is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effai.errors import UsageError
from effai.export import manifest as manifest_io
from effai.files import npz_headers
from effai.export.parity import TOLERANCES, check_artifact
from effai.data.photos import gaussian, normalize
from effai.export.targets import TARGETS, Lowered, TensorSpec


MAX_PARITY_SAMPLES = 4096     # export stores tens; a manifest asking for more is hand-edited


def verify(root: Path) -> dict[str, Any]:
    """Hash check (every listed file inside the directory, nothing unlisted, the model file among them), then
    parity. The manifest is untrusted: a malformed field is a UsageError naming it."""
    root = Path(root)
    m = manifest_io.read(root)
    problems = manifest_io.check_files(root, m)
    try:
        manifest_io.model_file(root, m)
    except UsageError as e:
        problems.insert(0, str(e).split(": ", 1)[-1])
    report: dict[str, Any] = {"artifact": str(root), "target": str(m.get("target"))[:40],
                              "files": len(m.get("files", [])), "hashes": "fail" if problems else "pass",
                              "hash_problems": problems}
    if problems:
        report["parity"] = {"status": "not-run", "reason": "hash check failed; the files are not the exported ones"}
        return report
    report["parity"] = rerun_parity(root, m)
    return report


def _malformed(root: Path, e: Exception) -> UsageError:
    return UsageError(f"{root / manifest_io.MANIFEST} has a missing or malformed field ({type(e).__name__}: "
                      f"{str(e)[:120]}); re-export the artifact")


def parity_samples(root: Path, m: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The exact inputs and torch reference outputs of the export-time parity check."""
    try:
        return _parity_samples(root, m)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _malformed(root, e) from None


def _parity_samples(root: Path, m: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    p = m["parity"]
    data_path = manifest_io.inside(root, p["data"])
    if data_path is None:
        raise UsageError(f"{root}: the manifest's parity data {str(p['data'])[:80]!r} is not a file inside the "
                         "artifact; re-export the artifact")
    pre = m["preprocessing"]
    c, (h, w) = int(pre["channels"]), (int(pre["input_size"][0]), int(pre["input_size"][1]))
    n = int(p["samples"])
    if not 0 <= n <= MAX_PARITY_SAMPLES or not 0 < c * h * w <= 3 * 4096 * 4096:
        raise UsageError(f"{root}: the manifest asks for {n} parity samples of {c}x{h}x{w} (at most "
                         f"{MAX_PARITY_SAMPLES} of up to 3x4096x4096); it was edited: re-export the artifact")
    npz_headers(data_path, f"{root}: the parity data {p['data']}")
    try:
        with np.load(data_path, allow_pickle=False) as data:
            photos = data["photos_u8"]
            refs = [data[k] for k in sorted((k for k in data.files if k.startswith("reference_")),
                                            key=lambda k: int(k[10:]))]
    except Exception as e:  # OSError, ValueError, KeyError, BadZipFile: all mean the same to the user
        raise UsageError(f"{root}: cannot read the parity data ({type(e).__name__}: {e}); re-export the artifact") from e
    parts = [normalize(photos, pre["mean"], pre["std"], c)] if photos.shape[0] else []
    parts.append(gaussian(max(0, n - photos.shape[0]), (c, h, w), p["noise_seed"]))
    return np.concatenate(parts), refs


def lowered_from_manifest(root: Path, m: dict[str, Any]) -> Lowered:
    """What the target's `load` needs (model file, I/O specs, details), read back from an artifact's manifest."""
    try:
        return Lowered(model_file=str(m["model_file"]),
                       inputs=[TensorSpec(str(i["name"]), tuple(int(d) for d in i["shape"]), str(i["dtype"]),
                                          str(i["layout"])) for i in m["inputs"]],
                       outputs=[TensorSpec(str(o["name"]), tuple(int(d) for d in o["shape"]), str(o["dtype"]),
                                           str(o["layout"])) for o in m["outputs"]],
                       details=dict(m.get("target_details", {})))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _malformed(root, e) from None


def rerun_parity(root: Path, m: dict[str, Any]) -> dict[str, Any]:
    target = TARGETS.get(str(m.get("target")))
    ok, why = target.available()
    if not ok:
        return {"status": "not-run", "reason": f"{m['target']} runtime not available here: {why}"}
    lowered = lowered_from_manifest(root, m)
    try:
        expected = {"input_shapes": [list(i.shape) for i in lowered.inputs],
                    "output_shapes": [list(o.shape) for o in lowered.outputs], "precision": str(m["precision"])}
        batch = int(m["parity"]["batch"])
        if batch < 1 or expected["precision"] not in TOLERANCES:
            raise ValueError(f"parity batch {batch} / precision {expected['precision'][:20]}")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _malformed(root, e) from None
    return check_artifact(target, root, lowered, expected, batch, lambda: parity_samples(root, m))
