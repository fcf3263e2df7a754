"""Loading a DeViT decomposition (`effai train devit` output) and checking that its pieces belong together.

Parts from a different decomposition (another split hash), the wrong class subset for their index, or a feature
width the fusion head does not take are refused with a UsageError before any data flows.
Files, metadata and hashes: docs/distill.md, "effai/devit_runtime/parts.py".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from effai import zoo
from effai.errors import UsageError
from effai.files import read_json, sha256
from effai.zoo.devit_fusion import Ensemble, FusionHead, check_widths


@dataclass
class Part:
    index: int
    model: nn.Module
    card: Any
    info: dict[str, Any]
    path: Path
    sha256: str = ""          # of the checkpoint file, read before the model was built from it

    @property
    def d_sub(self) -> int:
        return int(getattr(self.model, "num_features", self.info.get("d_sub", -1)))

    @property
    def split_hash(self) -> str:
        return str(self.info.get("split_hash"))


@dataclass
class Fusion:
    model: FusionHead
    card: Any
    info: dict[str, Any]
    path: Path

    @property
    def parts(self) -> int:
        return self.model.parts

    @property
    def split_hash(self) -> str:
        return str(self.info.get("split_hash"))


@dataclass
class Decomposition:
    parts: list[Part]
    fusion: Fusion
    manifest: dict[str, Any]

    def part_sha256(self, index: int) -> str:
        """The sha256 a device serving part `index` must report: the coordinator's own copy, which load_run held to
        devit.json's record when the run has one."""
        return self.parts[index].sha256

    def ensemble(self) -> Ensemble:
        """The single-process reference: all parts and the fusion head in this process."""
        return Ensemble([p.model for p in self.parts], self.fusion.model).eval()


def devit_info(path: Path) -> dict[str, Any]:
    """The `effai.devit` metadata of a checkpoint; UsageError when it is not a DeViT part or fusion head."""
    from safetensors import safe_open

    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint; give a run written by effai train devit")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return json.loads(meta["effai.devit"])
    except KeyError:
        raise UsageError(f"{path} is not a DeViT checkpoint (no effai.devit metadata); give a part_<i> or fusion "
                         "checkpoint written by effai train devit") from None
    except Exception as e:
        raise UsageError(f"{path}: cannot read its metadata ({e}); re-run effai train devit") from e


def load_part(path: str | Path) -> Part:
    path = _checkpoint(path)
    info = devit_info(path)
    if info.get("role") != "part":
        raise UsageError(f"{path} is the DeViT {info.get('role')}, not a part; give run/part_<i>/model.safetensors")
    digest = sha256(path)
    model = zoo.create(weights=path).model.eval()
    return Part(int(info["part"]), model, zoo.card_from_checkpoint(path), info, path, digest)


def load_fusion(path: str | Path) -> Fusion:
    path = _checkpoint(path)
    info = devit_info(path)
    if info.get("role") != "fusion":
        raise UsageError(f"{path} is DeViT {info.get('role')} {info.get('part')}, not the fusion head; give "
                         "run/fusion/model.safetensors")
    loaded = zoo.create(weights=path)
    return Fusion(loaded.model.eval(), loaded.card, info, path)  # type: ignore[arg-type]


def check_part(fusion: Fusion, part_info: dict[str, Any], where: str, index: int | None = None) -> None:
    """UsageError when a part (its effai.devit metadata) does not belong to this fusion head at `index`."""
    if part_info.get("split_hash") != fusion.split_hash:
        theirs = str(part_info.get("split_hash"))[:12]
        raise UsageError(f"{where} comes from another decomposition (split hash {theirs}…) than the fusion head "
                         f"{fusion.path} ({fusion.split_hash[:12]}…); use the parts and fusion head of one "
                         "effai train devit run")
    i = int(part_info.get("part", -1))
    if index is not None and i != index:
        raise UsageError(f"{where} is part {i}, but was given as part {index}; give part_<i> as --part i")
    subsets = fusion.info.get("subsets")
    if subsets is not None and not 0 <= i < len(subsets):
        raise UsageError(f"{where} is part {i}; the fusion head has parts 0..{len(subsets) - 1}")
    if subsets is not None and list(part_info.get("classes", [])) != list(subsets[i]):
        raise UsageError(f"{where} holds classes {part_info.get('classes')}, but part {i} of this decomposition holds "
                         f"{subsets[i]}; use the parts of the run that trained {fusion.path}")
    if int(part_info.get("d_sub", -1)) != fusion.model.d_sub:
        raise UsageError(f"{where} gives {part_info.get('d_sub')}-wide CLS features but the fusion head expects "
                         f"d_sub={fusion.model.d_sub}; use the parts trained with this fusion head")


def load_run(run_dir: str | Path, part_paths: list[str | Path] | None = None) -> Decomposition:
    """The fusion head and all N parts of a run (or the given part checkpoints, in part order), checked."""
    run = Path(run_dir)
    fusion = load_fusion(run / "fusion" / "model.safetensors")
    paths = [Path(p) for p in part_paths] if part_paths else [run / f"part_{i}" for i in range(fusion.parts)]
    if len(paths) != fusion.parts:
        raise UsageError(f"the fusion head fuses {fusion.parts} parts, {len(paths)} were given")
    parts = []
    for i, p in enumerate(paths):
        p = _checkpoint(p)
        check_part(fusion, devit_info(p), str(p), index=i)
        parts.append(load_part(p))
    check_widths([p.d_sub for p in parts], fusion.parts, fusion.model.d_sub)
    manifest_path = run / "devit.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    if not isinstance(manifest, dict):
        raise UsageError(f"{manifest_path} is not a JSON object; re-run effai train devit")
    recorded = manifest.get("parts")
    for i, part in enumerate(parts):
        want = recorded[i].get("sha256") if isinstance(recorded, list) and i < len(recorded) \
            and isinstance(recorded[i], dict) else None
        if want is not None and want != part.sha256:
            raise UsageError(f"{part.path} is not the part {i} that {manifest_path} records (sha256 "
                             f"{part.sha256[:12]}…, recorded {str(want)[:12]}…); restore the run's file or re-run "
                             "effai train devit")
    return Decomposition(parts, fusion, manifest)


def _checkpoint(path: str | Path) -> Path:
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() else p


def features_bytes(parts: int, d_sub: int, images: int = 1) -> int:
    """What crosses the network: N float32 CLS features per image."""
    return parts * d_sub * 4 * images
