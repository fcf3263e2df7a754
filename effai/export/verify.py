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
from effai.export.parity import check_artifact
from effai.export.samples import gaussian, normalize
from effai.export.targets import TARGETS, Lowered, TensorSpec


def verify(root: Path) -> dict[str, Any]:
    root = Path(root)
    m = manifest_io.read(root)
    problems = manifest_io.check_files(root, m)
    report: dict[str, Any] = {"artifact": str(root), "target": m["target"], "files": len(m.get("files", [])),
                              "hashes": "fail" if problems else "pass", "hash_problems": problems}
    if problems:
        report["parity"] = {"status": "not-run", "reason": "hash check failed; the files are not the exported ones"}
        return report
    report["parity"] = rerun_parity(root, m)
    return report


def parity_samples(root: Path, m: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The exact inputs and torch reference outputs of the export-time parity check."""
    p = m["parity"]
    try:
        with np.load(root / p["data"], allow_pickle=False) as data:
            photos = data["photos_u8"]
            refs = [data[k] for k in sorted((k for k in data.files if k.startswith("reference_")),
                                            key=lambda k: int(k[10:]))]
    except Exception as e:  # OSError, ValueError, KeyError, BadZipFile: all mean the same to the user
        raise UsageError(f"{root}: cannot read the parity data ({type(e).__name__}: {e}); re-export the artifact") from e
    pre = m["preprocessing"]
    c, (h, w) = pre["channels"], pre["input_size"]
    parts = [normalize(photos, pre["mean"], pre["std"], c)] if photos.shape[0] else []
    parts.append(gaussian(p["samples"] - photos.shape[0], (c, h, w), p["noise_seed"]))
    return np.concatenate(parts), refs


def rerun_parity(root: Path, m: dict[str, Any]) -> dict[str, Any]:
    target = TARGETS.get(m["target"])
    ok, why = target.available()
    if not ok:
        return {"status": "not-run", "reason": f"{m['target']} runtime not available here: {why}"}
    lowered = Lowered(model_file=m["model_file"],
                      inputs=[TensorSpec(i["name"], tuple(i["shape"]), i["dtype"], i["layout"]) for i in m["inputs"]],
                      outputs=[TensorSpec(o["name"], tuple(o["shape"]), o["dtype"], o["layout"]) for o in m["outputs"]],
                      details=m.get("target_details", {}))
    expected = {"input_shapes": [i["shape"] for i in m["inputs"]],
                "output_shapes": [o["shape"] for o in m["outputs"]], "precision": m["precision"]}
    return check_artifact(target, root, lowered, expected, m["parity"]["batch"], lambda: parity_samples(root, m))
