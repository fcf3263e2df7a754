"""`effai predict ARTIFACT IMAGE...`: top-k labels of images, run in the artifact's own runtime with the card's
preprocessing (an artifact dir, or a bundle: its first artifact that runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError


def predict_cmd(
    artifact: Annotated[Path, typer.Argument(help="An artifact dir (effai export) or a bundle (effai bundle pack).")],
    images: Annotated[list[Path], typer.Argument(help="Image files (png, jpg, ...).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Labels to show per image.")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Classify images with an exported artifact in its own runtime (ExecuTorch, LiteRT, ONNX Runtime, Core ML)."""
    from effai.api import load_artifact

    try:
        if top_k < 1:
            raise UsageError(f"--top-k {top_k} must be >= 1")
        missing = [str(i) for i in images if not i.is_file()]
        if missing:
            raise UsageError(f"image not found: {', '.join(missing[:3])}; pass image files (png, jpg, ...)")
        _refuse_other_kinds(artifact, images)
        model = load_artifact(_artifact_dir(artifact))
        results = model.predict(images, top_k=top_k)
    except EffaiError as e:
        fail(e, as_json)
    rows = [{"image": str(img), "top": [{"label": lab, "p": round(p, 6)} for lab, p in top]}
            for img, top in zip(images, results)]
    if not as_json:
        from rich.table import Table

        table = Table(title=f"effai predict ({model.manifest['target']} {model.manifest['precision']}, "
                            f"{model.runtime})")
        for col in ("image", "label", "p"):
            table.add_column(col, justify="right" if col == "p" else "left", overflow="fold")
        for r in rows:
            for i, t in enumerate(r["top"]):
                table.add_row(r["image"] if i == 0 else "", t["label"], f"{t['p']:.3f}")
        console.out().print(table)
    console.json_line({"ok": True, "artifact": str(model.path), "target": model.manifest["target"],
                       "runtime": model.runtime, "predictions": rows})


def _refuse_other_kinds(path: Path, images: list[Path]) -> None:
    """Generation, DeLVM and super-resolution artifacts have their own commands: name the one that runs them."""
    from effai.cli import delvm
    from effai.generate import artifact as generation
    from effai.superres import bench as sr

    img = images[0] if images else "IMG"
    if generation.is_artifact(path):
        raise UsageError(f"{path} is a generation (vision-language) artifact, not a classifier; ask it with "
                         f"effai generate {path} --image {img} --prompt TEXT")
    if delvm.is_artifact(path):
        raise UsageError(f"{path} is a DeLVM artifact, not a classifier; run it with effai generate {path} "
                         "--prompt-images a_in.png,a_out.png,b_in.png --out b_out.png")
    if sr.is_artifact(path):
        raise UsageError(f"{path} is a super-resolution artifact, not a classifier; run it with effai sr {path} "
                         f"{img} -o out.png")


def _artifact_dir(path: Path) -> Path:
    """The artifact dir itself, or for a bundle the first artifact whose runtime is installed here and that passed."""
    if (path / "manifest.json").is_file() or not (path / "bundle.json").is_file():
        return path
    from effai.bundle import index as index_mod
    from effai.export.targets import TARGETS

    index = index_mod.read(path)
    tried = []
    for a in index.get("artifacts", []):
        if a.get("status") not in ("pass", "unverified") or a.get("target") not in TARGETS.names():
            continue
        ok, why = TARGETS.get(a["target"]).available()
        if ok and (a["target"] != "coreml" or _macos()):
            return path / a["dir"]
        tried.append(f"{a['dir']}: {why if not ok else 'Core ML runs on macOS only'}")
    raise UsageError(f"bundle {path} has no artifact that runs here ({'; '.join(tried) or 'none passed'})")


def _macos() -> bool:
    import platform

    return platform.system() == "Darwin"


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_cmd)
