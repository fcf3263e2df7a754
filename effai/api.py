"""effai's public Python API (`import effai`): export, verify, bench, list_models, load_artifact.

The same pipeline as the CLI, callable on an in-memory `nn.Module`, a zoo/timm name or a checkpoint path. Examples:
docs/api.md.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from effai.errors import UsageError

__all__ = ["Artifact", "bench", "export", "list_models", "load_artifact", "verify"]


def export(model: Any, target: str = "onnx", *, quantize: str | None = None, example_inputs: Any = None,
           input_shape: Sequence[int] | None = None, out: str | Path | None = None, weights: str | Path | None = None,
           name: str | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           labels: Sequence[str] | None = None, eval: str = "auto", max_drop: float = 1.0, calib: str = "auto",
           calib_samples: int = 128, fold: bool = True, verify: bool = True, force: bool = False,
           progress: bool = False) -> Any:
    """Export `model` to `target` ("executorch" | "coreml" | "tflite" | "onnx"), prove parity in its runtime and
    write the artifact dir; returns an `ExportResult` (`.out_dir`, `.manifest`, `.parity`, `.accuracy`, ...).

    `model`: an `nn.Module` (give `example_inputs` or `input_shape` = (N, C, H, W); `mean`/`std`/`labels`/`name`
    describe it in the manifest), a zoo or timm name (`weights=` optional), or an effai checkpoint path
    (`.safetensors` carrying its model card). A failed parity or accuracy gate raises `ParityFailed`, whose
    `.result` is the kept artifact. An artifact of something else at `out` is replaced only with `force=True`."""
    from effai.export.pipeline import ExportConfig
    from effai.export.pipeline import export as run_export

    loaded, shape = _load(model, weights=weights, example_inputs=example_inputs, input_shape=input_shape, name=name,
                          mean=mean, std=std, labels=labels)
    cfg = ExportConfig(target=target, precision=quantize, input_shape=shape, out=Path(out) if out else None,
                       fold=fold, verify=verify, eval=eval, max_drop=max_drop, calib=calib,
                       calib_samples=calib_samples, force=force)
    return run_export(loaded, cfg, progress=_print_progress if progress else None)


def verify(artifact: str | Path) -> dict[str, Any]:
    """Re-check an artifact dir's file hashes and re-run its parity check in the runtime (`effai verify`)."""
    from effai.export.verify import verify as run_verify

    return run_verify(Path(artifact))


def bench(artifacts: str | Path | Sequence[str | Path], *, device: str = "host", threads: Sequence[int] = (2,),
          runs: int = 100, warmup: int = 10, energy: str = "auto", out: str | Path | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """Time artifact directories, or plain .onnx/.tflite/.pte files (inputs read from the file; `input_shapes`
    {input name: shape} for dynamic dims; no parity or accuracy check), on `device` ("host", "adb:SERIAL",
    "ssh:USER@HOST[:PORT]") at each thread count; returns one
    record per artifact x threads (median/p90/... in ms, load and first-inference time, energy where metered).
    The report is also written to `out` (default: a temp file)."""
    import tempfile

    from effai.device_bench.base import BenchConfig
    from effai.device_bench.bench import run_bench

    dirs = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="effai-bench-")) / "report.json"
    cfg = BenchConfig(threads=tuple(int(t) for t in threads), runs=runs, warmup=warmup, energy=energy)
    result = run_bench([Path(d) for d in dirs], device, cfg, Path(out), input_shapes=input_shapes)
    from effai.device_bench.report import record_to_dict

    return [record_to_dict(r) for r in result.records]


def list_models(pattern: str = "*", *, pretrained: bool = False, zoo_only: bool = False) -> list[str]:
    """Model names `export` takes: effai's zoo first, then timm's (`pretrained=True`: only those with hub weights),
    filtered by a glob `pattern` (e.g. "ghostnet*")."""
    from effai.zoo.catalog import CARDS

    names = [n for n in CARDS.names() if fnmatch.fnmatch(n, pattern)]
    if pretrained:
        names = [n for n in names if CARDS.get(n).bundled_weights]
    if zoo_only:
        return names
    import timm

    return names + [n for n in timm.list_models(pattern, pretrained=pretrained) if n not in names]


@dataclass
class Artifact:
    """An exported artifact loaded in its runtime. `run(x)` takes the model input (N x C x H x W float32, already
    preprocessed) and returns the outputs; `predict(images)` takes photos and does the card's preprocessing."""

    path: Path
    manifest: dict[str, Any]
    runtime: str
    runtime_version: str
    _run: Any

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels") or [])

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        want = tuple(self.manifest["inputs"][0]["shape"])
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != want:
            raise UsageError(f"input shape {tuple(x.shape)} does not match the artifact's {want}; re-export with "
                             "--input-shape for another shape")
        return [np.asarray(o) for o in self._run([x])]

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Image paths or HxWx3 uint8 arrays -> the model input per the manifest's preprocessing."""
        from effai.data.datasets import read_image
        from effai.data.photos import normalize, resize_crop

        pre = self.manifest["preprocessing"]
        out = []
        for im in images:
            rgb = read_image(Path(im), "RGB", "predict") if isinstance(im, (str, Path)) else np.asarray(im)
            if rgb.ndim == 2:
                rgb = np.repeat(rgb[..., None], 3, axis=2)
            out.append(resize_crop(rgb.astype(np.uint8), tuple(pre["input_size"]), pre["crop_pct"],
                                   pre["interpolation"]))
        return normalize(np.stack(out), pre["mean"], pre["std"], int(pre["channels"]))

    def predict(self, images: Sequence[Any], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image, run in the artifact's own runtime."""
        x = self.preprocess(images)
        batch = int(self.manifest["inputs"][0]["shape"][0])
        logits = []
        for i in range(0, x.shape[0], batch):
            chunk = x[i:i + batch]
            pad = batch - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            logits.append(self.run(chunk)[0][: batch - pad])
        z = np.concatenate(logits).astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        names = self.labels or [f"class_{i}" for i in range(p.shape[1])]
        k = min(top_k, p.shape[1])
        return [[(names[j], float(row[j])) for j in np.argsort(-row)[:k]] for row in p]


def load_artifact(path: str | Path, *, check_hashes: bool = True) -> Artifact:
    """An artifact dir (from `export` or `effai export`) loaded in its runtime on this machine. The files are
    hash-checked first; a runtime that cannot run here (Core ML off macOS) is a UsageError saying so."""
    from effai.export import manifest as manifest_io
    from effai.export.targets import TARGETS
    from effai.export.verify import lowered_from_manifest

    root = Path(path)
    m = manifest_io.read(root)
    if check_hashes:
        problems = manifest_io.check_files(root, m)
        if problems:
            raise UsageError(f"{root} failed its hash check ({'; '.join(problems[:3])}); re-export it")
    target = TARGETS.get(str(m.get("target")))
    ok, why = target.available()
    if not ok:
        raise UsageError(f"{root}: the {m['target']} runtime is not installed here: {why}")
    predictor = target.load(root, lowered_from_manifest(root, m))
    if isinstance(predictor, str):
        raise UsageError(f"{root}: {m['target']} artifacts cannot run here: {predictor}")
    return Artifact(root, m, predictor.runtime, predictor.version, predictor.run)


def _load(model: Any, *, weights: Any, example_inputs: Any, input_shape: Sequence[int] | None, name: str | None,
          mean: Sequence[float] | None, std: Sequence[float] | None, labels: Sequence[str] | None
          ) -> tuple[Any, tuple[int, int, int, int] | None]:
    """A zoo.LoadedModel for a module, a name or a checkpoint path, and the input shape to export at (None: the
    card's)."""
    import torch

    from effai import zoo

    shape = _shape(example_inputs, input_shape)
    if isinstance(model, torch.nn.Module):
        if shape is None:
            raise UsageError("export(nn.Module) needs example_inputs=torch.randn(1, 3, 224, 224) or "
                             "input_shape=(1, 3, 224, 224)")
        return _module(model, shape, name, mean, std, labels), shape
    if any(v is not None for v in (name, mean, std, labels)):
        raise UsageError("name/mean/std/labels describe an in-memory nn.Module; a zoo name or checkpoint has a card")
    if isinstance(model, Path) or (isinstance(model, str) and (model.endswith((".safetensors", ".pt", ".pth"))
                                                               or Path(model).is_dir())):
        path = Path(model)
        if path.is_dir() and (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        return zoo.create(weights=path), shape
    if isinstance(model, str):
        return zoo.create(model, weights=weights), shape
    raise UsageError(f"export() takes an nn.Module, a model name or a checkpoint path, not {type(model).__name__}")


def _shape(example_inputs: Any, input_shape: Sequence[int] | None) -> tuple[int, int, int, int] | None:
    if example_inputs is not None and input_shape is not None:
        raise UsageError("pass example_inputs or input_shape, not both")
    if example_inputs is not None:
        x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        input_shape = tuple(x.shape)
    if input_shape is None:
        return None
    dims = tuple(int(d) for d in input_shape)
    if len(dims) != 4 or min(dims) < 1:
        raise UsageError(f"input shape {dims} must be 4 positive numbers N x C x H x W, like (1, 3, 224, 224)")
    return dims  # type: ignore[return-value]


def _module(model: Any, shape: tuple[int, int, int, int], name: str | None, mean: Sequence[float] | None,
            std: Sequence[float] | None, labels: Sequence[str] | None) -> Any:
    """LoadedModel for an in-memory module: a card from the shape and hints, its weights hashed as given."""
    import hashlib

    import torch

    from effai import zoo
    from effai.zoo.card import IMAGENET_MEAN, IMAGENET_STD, ModelCard
    from effai.zoo.weights import WeightsInfo

    c = shape[1]
    mean = tuple(mean) if mean is not None else (IMAGENET_MEAN if c == 3 else (0.5,) * c)
    std = tuple(std) if std is not None else (IMAGENET_STD if c == 3 else (0.5,) * c)
    if len(mean) != c or len(std) != c:
        raise UsageError(f"mean/std need {c} values (one per input channel), got {len(mean)} and {len(std)}")
    model = model.eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros(shape))
        except Exception as e:
            raise UsageError(f"the module cannot run on input {shape} ({type(e).__name__}: {str(e)[:160]}); pass "
                             "the input shape it takes") from e
    first = out[0] if isinstance(out, (tuple, list)) else out
    classes = int(first.shape[-1]) if hasattr(first, "shape") and first.ndim == 2 else 0
    extra: dict[str, Any] = {}
    if labels is not None:
        if len(labels) != classes:
            raise UsageError(f"{len(labels)} labels for {classes} model outputs")
        extra["labels"] = [str(x) for x in labels]
    card = ModelCard(name=name or type(model).__name__, family="user", source=f"module:{type(model).__name__}",
                     input_size=shape[1:], mean=mean, std=std, crop_pct=1.0, num_classes=classes, label_set=None,
                     weights_license="unknown", description=f"in-memory {type(model).__name__}", extra=extra)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    weights = WeightsInfo(source="in-memory module", sha256=h.hexdigest())
    return zoo.LoadedModel(model, card, weights)


def _print_progress(event: str, stage: str, detail: str, seconds: float) -> None:
    if event != "start":
        print(f"{'ok' if event == 'end' else 'FAILED'} {stage:<9} {seconds:6.2f}s  {detail}")
