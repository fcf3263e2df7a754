"""`effai devit export`: every piece of a DeViT decomposition exported for its device (OUT/part_<i>/, OUT/fusion/: each
an effai export artifact dir), plus OUT/devit_bundle.json (effai.devit-bundle/1), the record of which artifact runs
where. The decomposition is checked first; a failed export leaves no half-written bundle.
Layout and checks: docs/distill.md, "effai/devit_runtime/export.py".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from effai.devit_runtime.parts import features_bytes, load_run
from effai.files import staging_dir
from effai.errors import UsageError

SCHEMA = "effai.devit-bundle/1"


def export_run(run_dir: Path, targets: list[str], out: Path, precision: str | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from effai import zoo
    from effai.export.pipeline import ExportConfig, export
    from effai.files import atomic_write, replace_dir, sha256

    decomp = load_run(run_dir)
    if out.exists() and not (out / "devit_bundle.json").is_file():
        raise UsageError(f"--out {out} exists and is not a DeViT bundle; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out, mode=0o700)
    n, d_sub = decomp.fusion.parts, decomp.fusion.model.d_sub
    data = str(decomp.manifest.get("config", {}).get("data") or "")
    calib = data if data == "digits" or Path(data).is_dir() else "auto"   # the parts calibrate on the run's images
    pieces = [("part", p.index, p.path, f"device {p.index} (rank {p.index + 1})", list(p.info.get("classes", [])))
              for p in decomp.parts]
    pieces.append(("fusion", None, decomp.fusion.path, "coordinator (rank 0)", None))
    record: dict[str, Any] = {"schema": SCHEMA, "run": str(run_dir), "split_hash": decomp.fusion.split_hash,
                              "parts": n, "d_sub": d_sub, "traffic_bytes_per_image": features_bytes(n, d_sub),
                              "pieces": []}
    try:
        for role, index, path, runs_on, classes in pieces:
            name = role if index is None else f"part_{index}"
            entry: dict[str, Any] = {"role": role, "index": index, "runs_on": runs_on, "classes": classes,
                                     "checkpoint_sha256": sha256(path), "artifacts": {}}
            # the fusion head takes CLS features, not images: no image calibration set fits it, so it stays float
            prec = precision if role == "part" else None
            if precision and role == "fusion":
                entry["note"] = (f"kept at the target's float precision: {precision} needs calibration on CLS "
                                 "features, which effai does not collect yet (the head is 2 small Linear layers)")
            for target in targets:
                sub = f"{name}/{target}" + (f"-{prec}" if prec else "")
                if progress:
                    progress(f"{name} -> {target}")
                res = export(zoo.create(weights=path), ExportConfig(target=target, precision=prec, out=tmp / sub,
                                                                    eval="none", calib=calib))
                m = res.manifest
                entry["artifacts"][target] = {"dir": sub, "file": f"{sub}/{m['model_file']}",
                                              "manifest_sha256": sha256(tmp / sub / "manifest.json"),
                                              "precision": m["precision"],
                                              "parity": m["parity"]["status"],
                                              "max_abs_err": m["parity"].get("max_abs_err")}
            record["pieces"].append(entry)
        atomic_write(tmp / "devit_bundle.json", json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
