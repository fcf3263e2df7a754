"""The export pipeline, one way through named stages: fold -> trace -> lower -> parity -> metadata -> manifest ->
commit.

    result = export(zoo.create("ghostnetv3_100"), ExportConfig(target="onnx"))

Every stage is timed and reported through `progress(event, stage, detail, seconds)`; nothing is skipped silently (a
skipped stage is a manifest line). Toolchain output goes to export.log inside the artifact.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effai.version import __version__
from effai import toolchain, zoo
from effai.errors import EffaiError, UsageError, choices_hint
from effai.export import artifact_dir, fallback as fallback_stage, manifest as manifest_io, metadata
from effai.export.diagnose import lowering_error
from effai.export.fold import FoldReport, flat_outputs, fold
from effai.export.fallback import gate_failed
from effai.export.parity import check_artifact
from effai.export.plan import require
from effai.export.precisions import PRECISIONS
from effai.export.quiet import captured
from effai.data.photos import parity_inputs
from effai.export.targets import TARGETS, LowerOptions
from effai.export.targets.base import ALL_LAYERS
from effai.export.trace import trace

Progress = Callable[[str, str, str, float], None]   # (event "start"|"end", stage, detail, seconds)
LOG = manifest_io.LOG


@dataclass(frozen=True)
class ExportConfig:
    target: str
    precision: str | None = None                  # None: the target's default (fp16 for Core ML, else fp32)
    input_shape: tuple[int, int, int, int] | None = None   # full N,C,H,W; overrides the card and --batch
    input_size: int | None = None                 # square H=W override of the card's size
    batch: int = 1                                # exported batch size (static: mobile runtimes plan memory for it)
    out: Path | None = None                       # default: effai_out/<model>-<target>[-<precision>]
    fold: bool = True
    verify: bool = True
    parity_photos: int = 6                        # real photos (scikit-image) per parity run
    parity_noise: int = 2                         # seeded Gaussian inputs on top
    seed: int = 0
    eval: str | None = "auto"                     # labelled data for top-1: digits | DIR | .npz | auto (the card's) | none
    max_drop: float = 1.0                         # fail when the artifact loses more top-1 points than this
    calib: str = "auto"                           # calibration data for static int8: auto | photos | digits | DIR | .npz
    calib_samples: int = 128                      # how many calibration inputs
    io_dtype: str = "float"                       # TFLite int8: float32 or int8 input/output tensors
    fallback: bool = True                         # on a failed accuracy gate, keep the most sensitive layers in float
    float_layers: tuple[str, ...] = ()            # layers to keep in float from the start (module names)


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def parity_status(self) -> str:
        return self.manifest["parity"]["status"]


class ParityFailed(EffaiError):
    """The artifact was written (marked failed in its manifest) but does not match the torch reference."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Outcome:
    """One target's export inside a loop over several: what was written (None: nothing) and why it failed (None:
    it did not). A ParityFailed keeps its written result."""
    target: str
    result: ExportResult | None
    error: EffaiError | None


def try_export(loaded: zoo.LoadedModel, cfg: ExportConfig, progress: Any = None) -> Outcome:
    """export() for loops over targets (`effai export --target all`, `effai bundle pack`): any failure, a toolchain
    bug included, becomes the Outcome's error, so the other targets still run (EFFAI_DEBUG=1 re-raises bugs)."""
    try:
        return Outcome(cfg.target, export(loaded, cfg, progress=progress), None)
    except ParityFailed as e:
        return Outcome(cfg.target, e.result, e)
    except EffaiError as e:
        return Outcome(cfg.target, None, e)
    except Exception as e:
        if os.environ.get("EFFAI_DEBUG"):
            raise
        return Outcome(cfg.target, None, EffaiError(f"internal error exporting to {cfg.target}: {type(e).__name__}: "
                                                    f"{e} (EFFAI_DEBUG=1 shows the traceback; please report it)"))


def safe_name(name: str) -> str:
    """A model name usable as one path component (names can come from a checkpoint's metadata)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "model"


def resolve(loaded: zoo.LoadedModel, cfg: ExportConfig) -> tuple[Any, str, tuple[int, int, int, int], Path]:
    """Validate the config against the target and the model up front: (target, precision, input shape, out dir)."""
    target = TARGETS.get(cfg.target)
    ok, why = target.available()
    if not ok:
        raise EffaiError(f"target '{cfg.target}' is not available here: {why}")
    precision = require(cfg.target, cfg.precision)
    if cfg.io_dtype not in ("float", "int8"):
        raise UsageError(f"--io-dtype {cfg.io_dtype!r}: choose float or int8")
    if cfg.io_dtype == "int8" and (cfg.target, precision) != ("tflite", "int8"):
        raise UsageError("--io-dtype int8 applies to --target tflite --quantize int8 only (other targets and "
                         "precisions keep float32 inputs and outputs)")
    if cfg.float_layers and not PRECISIONS.get(precision).quantized:
        raise UsageError(f"--float-layers needs a quantized precision; {precision} is already float")
    c, h, w = loaded.card.input_size
    if cfg.input_size is not None:
        h = w = cfg.input_size
    shape = cfg.input_shape or (cfg.batch, c, h, w)
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"input shape {shape} must be 4 positive numbers N x C x H x W (e.g. 1x3x224x224)")
    if shape[1] != c:
        raise UsageError(f"input shape has {shape[1]} channels but {loaded.card.name} takes {c}; "
                         f"use --input-shape {shape[0]}x{c}x{shape[2]}x{shape[3]}")
    name = safe_name(loaded.card.name)
    suffix = f"-{precision}" if precision != target.precisions[0] else ""
    out = Path(cfg.out) if cfg.out is not None else Path("effai_out") / f"{name}-{cfg.target}{suffix}"
    return target, precision, tuple(int(s) for s in shape), out  # type: ignore[return-value]


def export(loaded: zoo.LoadedModel, cfg: ExportConfig, progress: Progress | None = None) -> ExportResult:
    """Export one model to one target. The caller's model is not modified (the pipeline folds a copy)."""
    target, precision, shape, out = resolve(loaded, cfg)
    card = loaded.card.with_(input_size=shape[1:])
    timings: dict[str, float] = {}
    tmp = artifact_dir.prepare(out)
    log = tmp / LOG

    @contextmanager
    def stage(name: str, detail: str = "") -> Iterator[dict[str, str]]:
        note = {"detail": detail}
        if progress:
            progress("start", name, detail, 0.0)
        t0 = time.perf_counter()
        try:
            with captured(log):
                yield note
        except BaseException:
            if progress:
                progress("fail", name, note["detail"], time.perf_counter() - t0)
            raise
        elapsed = time.perf_counter() - t0
        timings[name] = round(timings.get(name, 0.0) + elapsed, 3)   # the fallback repeats lower/parity/eval
        if progress:
            progress("end", name, note["detail"], elapsed)

    try:
        model = copy.deepcopy(loaded.model).eval()
        preprocessing = card.preprocessing()
        n_noise = cfg.parity_noise + (-(cfg.parity_photos + cfg.parity_noise) % shape[0])  # whole batches
        inputs, photos, sample_names = parity_inputs(preprocessing, cfg.parity_photos, n_noise, cfg.seed)
        example = (torch.from_numpy(inputs[: shape[0]]).contiguous(),)
        warnings: list[str] = []

        with stage("fold") as note:
            try:
                with torch.no_grad():
                    ref_t = flat_outputs(model(torch.from_numpy(inputs)))
            except Exception as e:  # the model itself rejects this input shape
                raise UsageError(f"{card.name} cannot run on input {shape[1:]} ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); its card's size is "
                                 f"{'x'.join(map(str, loaded.card.input_size))}: pass a size it supports") from e
            reference = [o.numpy().copy() for o in ref_t]
            if cfg.fold:
                report = fold(model, (torch.from_numpy(inputs),), reference=ref_t, target=cfg.target)
                note["detail"] = (f"{sum(report.reparameterized.values())} blocks re-parameterized, "
                                  f"{report.fused_conv_bn + report.fused_linear_bn} BN fused, "
                                  f"{sum(report.rewritten.values())} ops rewritten, "
                                  f"params {report.params_before:,} -> {report.params_after:,}")
            else:
                report = FoldReport(skipped="disabled by --no-fold")
                note["detail"] = "skipped (--no-fold)"
        prec = PRECISIONS.get(precision)
        rule = target.quantizes.get(precision, ALL_LAYERS)
        if cfg.float_layers:
            from effai.export.sensitivity import quantizable_layers

            layers = quantizable_layers(model)
            for n in cfg.float_layers:
                if n not in layers:
                    raise UsageError(f"--float-layers: {card.name} has no Conv2d/Linear layer '{n}'; "
                                     f"{choices_hint(n, layers)}")
            covered = set(quantizable_layers(model, rule))
            idle = [n for n in cfg.float_layers if n not in covered]
            if idle:
                warnings.append(f"--float-layers {', '.join(idle)}: {cfg.target} {precision} does not quantize "
                                f"{'this layer' if len(idle) == 1 else 'these layers'} anyway")
        calib = None
        if prec.needs_calibration or (prec.quantized and cfg.fallback):
            with stage("calib", cfg.calib) as note:
                from effai.export import calibration

                calib = calibration.load(cfg.calib, preprocessing, card, cfg.calib_samples, cfg.seed)
                calibration.check_finite(model, calib.x)
                note["detail"] = f"{calib.x.shape[0]} samples from {calib.source}"
                warnings.extend(calib.warnings)
        program = model
        if target.needs_exported_program:
            with stage("trace", "torch.export") as note:
                program = trace(model, example)
        eval_spec = card.extra.get("eval_data") if cfg.eval == "auto" else (None if cfg.eval == "none" else cfg.eval)
        evaluation = _eval_reference(loaded, card, eval_spec) if eval_spec else None

        def attempt(float_layers: tuple[str, ...], label: str = "") -> tuple[Any, dict, dict | None]:
            """lower -> parity -> eval with these layers kept in float."""
            with stage("lower", f"{cfg.target} {precision}{label}") as note:
                names = ("logits",) if len(reference) == 1 else tuple(f"output_{i}" for i in range(len(reference)))
                options = LowerOptions(precision=precision, output_names=names,
                                       calibration=calib.x if calib is not None else None,
                                       float_layers=float_layers, io_dtype=cfg.io_dtype)
                _clear_model_files(tmp)
                try:
                    lowered = target.lower(program, example, options, tmp)
                except (EffaiError, OSError):
                    raise
                except Exception as e:
                    others = {n: t for n, t in TARGETS.items() if n != cfg.target and t.available()[0]}

                    def probe(op: str) -> dict[str, bool] | None:
                        from effai.export.op_probe import targets_taking

                        return targets_taking(model, example, op, others)

                    raise lowering_error(cfg.target, e, log, list(others), probe) from e
                note["detail"] = f"{lowered.model_file} {_size_mb(tmp / lowered.model_file):.2f} MB"
                d = lowered.details.get("delegation")
                if d:
                    outside = sum(n for op, n in d["non_delegated_ops"].items() if op != "getitem")
                    note["detail"] += (f", {d['partitions']} XNNPACK partition(s), {d['delegated_nodes']} ops "
                                       f"delegated, {outside} outside")
            with stage("parity") as note:
                parity = _parity(target, tmp, lowered, cfg, precision, inputs, reference, shape, sample_names)
                note["detail"] = _parity_line(parity)
            accuracy = None
            if eval_spec:
                with stage("eval", eval_spec) as note:
                    accuracy = _accuracy(evaluation, target, tmp, lowered, cfg, shape[0])
                    a = accuracy
                    note["detail"] = (f"top-1 torch {a['torch']['top1']:.2%}, artifact "
                                      + (f"{a['artifact']['top1']:.2%} ({a['status']})" if "artifact" in a
                                         else f"not-run ({a['reason']})") + f" on {a['samples']} images")
            return lowered, parity, accuracy

        lowered, parity, accuracy = attempt(tuple(cfg.float_layers))
        fallback = None
        if prec.quantized and cfg.fallback and gate_failed(parity, accuracy):
            (lowered, parity, accuracy), fallback, note = fallback_stage.run(
                attempt, (lowered, parity, accuracy), model=model, calib_x=calib.x, precision=precision, rule=rule,
                float_layers=tuple(cfg.float_layers), stage=stage,
                size_mb=lambda low: _size_mb(tmp / low.model_file))
            if note:
                warnings.append(note)
        warnings.extend(lowered.details.get("warnings", []))
        quantization = None
        if prec.quantized:
            quantization = {"precision": precision, "description": prec.description,
                            **lowered.details.get("quantization", {}),
                            "calibration": calib.to_dict() if calib is not None and prec.needs_calibration else None,
                            "fallback": fallback}
        labels = zoo.labels(card) if card.num_classes else []
        if not labels and reference and reference[0].ndim == 2:
            labels = [f"class_{i}" for i in range(reference[0].shape[1])]
        with stage("metadata", cfg.target) as note:   # the model's description inside the model file itself
            info = metadata.describe(card, loaded.weights.sha256, loaded.random_init, preprocessing, labels)
            native = metadata.embed(target, tmp, lowered, info, inputs[: shape[0]] if cfg.verify else None)
            note["detail"] = metadata.summary(native)
        with stage("manifest") as note:
            np.savez_compressed(tmp / manifest_io.PARITY_DATA, photos_u8=photos,
                                **{f"reference_{i}": r for i, r in enumerate(reference)})
            manifest = {
                "effai_version": __version__,
                "model": {"name": card.name, "family": card.family, "source": card.source,
                          "weights": loaded.weights.source, "weights_sha256": loaded.weights.sha256,
                          "random_init": loaded.random_init, "weights_license": card.weights_license,
                          "description": card.description},
                "target": cfg.target,
                "precision": precision,
                "status": _status(parity, accuracy),
                "quantization": quantization,
                "warnings": warnings,
                "runtime_settings": runtime_settings(),
                "model_file": lowered.model_file,
                "inputs": [s.to_dict() for s in lowered.inputs],
                "outputs": [s.to_dict() for s in lowered.outputs],
                "preprocessing": preprocessing,
                "labels": labels,
                "native_metadata": native,
                "fold": report.to_dict(),
                "parity": {**parity, "samples": len(sample_names), "sample_names": sample_names,
                           "data": manifest_io.PARITY_DATA, "noise_seed": cfg.seed,
                           "n_photos": int(photos.shape[0]), "batch": shape[0]},
                "accuracy": accuracy,
                "target_details": lowered.details,
                "toolchain": toolchain.versions(),
                "export_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "timings_s": timings,
            }
            manifest = manifest_io.write(tmp, manifest)
            note["detail"] = f"{len(manifest['files'])} files hashed"
        artifact_dir.commit(tmp, out)
    except OSError as e:
        artifact_dir.discard(tmp)
        raise artifact_dir.io_error(e, out) from e
    except BaseException:
        _keep_log(log, out)
        artifact_dir.discard(tmp)
        raise
    result = ExportResult(out, manifest, timings)
    if accuracy is not None and accuracy["status"] == "fail":
        raise ParityFailed(f"{cfg.target} artifact failed the accuracy gate: {accuracy['reason']}; it was kept at "
                           f"{out} and marked failed in its manifest", result)
    if parity["status"] == "fail":
        raise ParityFailed(f"{cfg.target} artifact does not match the torch model: {parity.get('reason')}; it was "
                           f"kept at {out} and marked failed in its manifest", result)
    return result


def _status(parity: dict[str, Any], accuracy: dict[str, Any] | None) -> str:
    """One word for apps and bundles: fail (parity or accuracy gate failed), pass (checked in a runtime), or
    unverified (no runtime here, e.g. Core ML on Linux: structural check only)."""
    if gate_failed(parity, accuracy):
        return "fail"
    return "pass" if parity["status"] == "pass" else "unverified"


def _clear_model_files(tmp: Path) -> None:
    """Remove what a previous lowering attempt wrote (the fallback re-lowers into the same temp dir)."""
    for p in tmp.iterdir():
        if p.name.startswith("model."):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def runtime_settings() -> dict[str, Any]:
    """Threads for this host's runtimes: the physical cores up to 4 (beyond that, mobile-sized models gain little
    and contend with the app); recorded so bench and apps start from a measured-sensible default."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"threads": max(1, min(4, n)), "host_cpus": n}


def _parity(target: Any, tmp: Path, lowered: Any, cfg: ExportConfig, precision: str, inputs: np.ndarray,
            reference: list[np.ndarray], shape: tuple[int, ...], names: list[str]) -> dict[str, Any]:
    if not cfg.verify:
        return {"status": "not-run", "reason": "disabled by --no-verify"}
    expected = {"input_shapes": [shape], "output_shapes": [(shape[0], *r.shape[1:]) for r in reference],
                "precision": precision}
    out = check_artifact(target, tmp, lowered, expected, shape[0], lambda: (inputs, reference))
    if "runtime" in out:
        out["reference"] = "torch fp32 (unfolded, eager)"
    return out


def _eval_reference(loaded: zoo.LoadedModel, card: Any, spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(inputs, labels, torch fp32 logits, description): loaded before lowering, so bad --eval data fails fast."""
    from effai.export import evaluate as ev

    x, labels, what = ev.eval_set(spec, card)
    with torch.no_grad():
        ref = np.concatenate([flat_outputs(loaded.model(torch.from_numpy(x[i:i + 256])))[0].numpy()
                              for i in range(0, x.shape[0], 256)])
    return x, labels, ref, what


def _accuracy(evaluation: tuple, target: Any, tmp: Path, lowered: Any, cfg: ExportConfig,
              batch: int) -> dict[str, Any]:
    from effai.export import evaluate as ev

    x, labels, ref, what = evaluation
    predictor = target.load(tmp, lowered)
    if isinstance(predictor, str):
        return ev.accuracy_report(ref, None, labels, cfg.max_drop, what, reason=predictor)
    return ev.accuracy_report(ref, ev.run_all(predictor.run, x, batch), labels, cfg.max_drop, what)


def _parity_line(p: dict[str, Any]) -> str:
    if p["status"] == "not-run":
        s = p.get("structural")
        return f"not-run ({p['reason']})" + (f"; structural check {s['status']}" if s else "")
    if "max_abs_err" not in p:
        return f"{p['status']}: {p.get('reason', '')}"
    top1 = f", top-1 {p['top1_agreement']:.0%}" if p.get("top1_agreement") is not None else ""
    return f"{p['status']}: max abs err {p['max_abs_err']:.2e} ({p['rel_err']:.1e} rel), cos {p['cosine']:.6f}{top1}"


def _keep_log(log: Path, out: Path) -> None:
    """A failed export's toolchain log, kept in $TMPDIR for the bug report (an empty one is not worth a file)."""
    if log.is_file() and log.stat().st_size > 0:
        try:
            fd, dest = tempfile.mkstemp(prefix=f"effai-export-{out.name}-", suffix=".log")
            with os.fdopen(fd, "wb") as f, open(log, "rb") as src:
                shutil.copyfileobj(src, f)
        except OSError:
            pass


def _size_mb(p: Path) -> float:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6
    return p.stat().st_size / 1e6
