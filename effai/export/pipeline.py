"""The export pipeline, one way through its stages: fold -> trace -> lower -> parity -> metadata -> manifest -> commit.

    result = export(zoo.create("ghostnetv3_100"), ExportConfig(target="onnx"))

Every stage is timed and reported through `progress(event, stage, detail, seconds)`; nothing is skipped silently (a
skipped stage is a manifest line). Toolchain output goes to export.log inside the artifact.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    force: bool = False                           # replace an artifact at `out` exported from something else


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def parity_status(self) -> str:
        return self.manifest["parity"]["status"]

    @property
    def status(self) -> str:
        """pass | fail | unverified (no runtime here, e.g. Core ML on Linux)."""
        return self.manifest["status"]

    @property
    def parity(self) -> dict[str, Any]:
        return self.manifest["parity"]

    @property
    def accuracy(self) -> dict[str, Any] | None:
        return self.manifest.get("accuracy")

    @property
    def model_file(self) -> Path:
        return self.out_dir / self.manifest["model_file"]

    def __repr__(self) -> str:
        return (f"ExportResult({self.manifest['target']} {self.manifest['precision']}, {self.status}, "
                f"{self.model_file})")


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
    shape = tuple(int(s) for s in shape)
    out = Path(cfg.out) if cfg.out is not None else Path("effai_out") / artifact_dir.artifact_name(loaded, cfg.target, precision,
                                                                                     shape, cfg.io_dtype)
    return target, precision, shape, out  # type: ignore[return-value]


@dataclass
class Run:
    """One export in progress: the resolved config and what each stage adds for the next ones."""
    loaded: zoo.LoadedModel
    cfg: ExportConfig
    target: Any
    precision: str
    shape: tuple[int, int, int, int]
    out: Path
    tmp: Path
    progress: Progress | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model: Any = None                     # the caller's model, copied (fold changes it)
    inputs: np.ndarray | None = None      # parity inputs: photos + seeded noise, preprocessed per the card
    photos: np.ndarray | None = None
    sample_names: list[str] = field(default_factory=list)
    reference: list[np.ndarray] = field(default_factory=list)   # torch fp32 outputs of the unfolded model
    report: FoldReport | None = None
    calib: Any = None
    program: Any = None                   # what the target lowers: the folded module, or its ExportedProgram
    eval_spec: str | None = None
    evaluation: tuple | None = None
    card: Any = None                      # the model's card at the exported input size

    def __post_init__(self) -> None:
        self.card = self.loaded.card.with_(input_size=self.shape[1:])

    @property
    def log(self) -> Path:
        return self.tmp / LOG

    @property
    def example(self) -> tuple[torch.Tensor]:
        return (torch.from_numpy(self.inputs[: self.shape[0]]).contiguous(),)

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[dict[str, str]]:
        """Time a stage, capture toolchain output into the log, report start/end/fail to `progress`."""
        note = {"detail": detail}
        if self.progress:
            self.progress("start", name, detail, 0.0)
        t0 = time.perf_counter()
        try:
            with captured(self.log):
                yield note
        except BaseException:
            if self.progress:
                self.progress("fail", name, note["detail"], time.perf_counter() - t0)
            raise
        elapsed = time.perf_counter() - t0
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 3)   # the fallback repeats lower/parity/eval
        if self.progress:
            self.progress("end", name, note["detail"], elapsed)


def export(loaded: zoo.LoadedModel, cfg: ExportConfig, progress: Progress | None = None) -> ExportResult:
    """Export one model to one target. The caller's model is not modified (the pipeline folds a copy)."""
    target, precision, shape, out = resolve(loaded, cfg)
    replaced = artifact_dir.check_replace(out, artifact_dir.identity(loaded, cfg.target, precision, shape, cfg.io_dtype), cfg.force)
    run = Run(loaded, cfg, target, precision, shape, out, artifact_dir.prepare(out), progress)
    if replaced:
        run.warnings.append(replaced)
    try:
        prepare(run)
        fold_stage(run)
        prec = PRECISIONS.get(precision)
        rule = target.quantizes.get(precision, ALL_LAYERS)
        check_float_layers(run, rule)
        if prec.needs_calibration:
            calib_stage(run)
        trace_stage(run)
        lowered, parity, accuracy = attempt(run, tuple(cfg.float_layers))
        fallback = None
        if prec.quantized and cfg.fallback and gate_failed(parity, accuracy):
            if run.calib is None:          # weight-only / dynamic precisions load inputs only to rank layers
                calib_stage(run)
            (lowered, parity, accuracy), fallback, note = fallback_stage.run(
                lambda layers, label="": attempt(run, layers, label), (lowered, parity, accuracy), model=run.model,
                calib_x=run.calib.x, precision=precision, rule=rule, float_layers=tuple(cfg.float_layers),
                stage=run.stage, size_mb=lambda low: _size_mb(run.tmp / low.model_file))
            if note:
                run.warnings.append(note)
        run.warnings.extend(lowered.details.get("warnings", []))
        run.warnings.extend(_coverage_warning(run, lowered))
        labels = _labels(run)
        native = metadata_stage(run, lowered, labels)
        manifest = manifest_stage(run, lowered, parity, accuracy, native, labels, _quantization(run, prec, lowered,
                                                                                               fallback))
        artifact_dir.commit(run.tmp, out)
    except OSError as e:
        artifact_dir.discard(run.tmp)
        raise artifact_dir.io_error(e, out) from e
    except BaseException:
        _keep_log(run.log, out)
        artifact_dir.discard(run.tmp)
        raise
    result = ExportResult(out, manifest, run.timings)
    if accuracy is not None and accuracy["status"] == "fail":
        raise ParityFailed(f"{cfg.target} artifact failed the accuracy gate: {accuracy['reason']}; it was kept at "
                           f"{out} and marked failed in its manifest", result)
    if parity["status"] == "fail":
        raise ParityFailed(f"{cfg.target} artifact does not match the torch model: {parity.get('reason')}; it was "
                           f"kept at {out} and marked failed in its manifest", result)
    return result


def prepare(run: Run) -> None:
    """A copy of the model to fold, the parity inputs (real photos + seeded noise, whole batches)."""
    cfg = run.cfg
    run.model = copy.deepcopy(run.loaded.model).eval()
    n_noise = cfg.parity_noise + (-(cfg.parity_photos + cfg.parity_noise) % run.shape[0])
    run.inputs, run.photos, run.sample_names = parity_inputs(run.card.preprocessing(), cfg.parity_photos, n_noise,
                                                             cfg.seed)


def fold_stage(run: Run) -> None:
    """The torch reference outputs, then re-parameterization and BN fusion (checked exact against them)."""
    with run.stage("fold") as note:
        try:
            with torch.no_grad():
                ref_t = flat_outputs(run.model(torch.from_numpy(run.inputs)))
        except Exception as e:  # the model itself rejects this input shape
            raise UsageError(f"{run.card.name} cannot run on input {run.shape[1:]} ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); its card's size is "
                             f"{'x'.join(map(str, run.loaded.card.input_size))}: pass a size it supports") from e
        run.reference = [o.numpy().copy() for o in ref_t]
        if run.cfg.fold:
            r = fold(run.model, (torch.from_numpy(run.inputs),), reference=ref_t, target=run.cfg.target)
            note["detail"] = (f"{sum(r.reparameterized.values())} blocks re-parameterized, "
                              f"{r.fused_conv_bn + r.fused_linear_bn} BN fused, {sum(r.rewritten.values())} ops "
                              f"rewritten, params {r.params_before:,} -> {r.params_after:,}")
        else:
            r = FoldReport(skipped="disabled by --no-fold")
            note["detail"] = "skipped (--no-fold)"
        run.report = r


def check_float_layers(run: Run, rule: Any) -> None:
    """--float-layers name real Conv2d/Linear layers; a warning for those the target's quantizer leaves alone."""
    cfg = run.cfg
    if not cfg.float_layers:
        return
    from effai.export.sensitivity import quantizable_layers

    layers = quantizable_layers(run.model)
    for n in cfg.float_layers:
        if n not in layers:
            raise UsageError(f"--float-layers: {run.card.name} has no Conv2d/Linear layer '{n}'; "
                             f"{choices_hint(n, layers)}")
    covered = set(quantizable_layers(run.model, rule))
    idle = [n for n in cfg.float_layers if n not in covered]
    if idle:
        run.warnings.append(f"--float-layers {', '.join(idle)}: {cfg.target} {run.precision} does not quantize "
                            f"{'this layer' if len(idle) == 1 else 'these layers'} anyway")


def calib_stage(run: Run) -> None:
    """Calibration inputs for static int8 (and for ranking layers when the accuracy gate needs the fallback)."""
    with run.stage("calib", run.cfg.calib) as note:
        from effai.export import calibration

        run.calib = calibration.load(run.cfg.calib, run.card.preprocessing(), run.card, run.cfg.calib_samples,
                                     run.cfg.seed)
        calibration.check_finite(run.model, run.calib.x)
        note["detail"] = f"{run.calib.x.shape[0]} samples from {run.calib.source}"
        run.warnings.extend(run.calib.warnings)


def trace_stage(run: Run) -> None:
    """torch.export for the targets that lower an ExportedProgram; the labelled --eval set, loaded before lowering."""
    run.program = run.model
    if run.target.needs_exported_program:
        with run.stage("trace", "torch.export"):
            run.program = trace(run.model, run.example)
    cfg = run.cfg
    run.eval_spec = run.card.extra.get("eval_data") if cfg.eval == "auto" else (None if cfg.eval == "none" else cfg.eval)
    run.evaluation = _eval_reference(run.loaded, run.card, run.eval_spec) if run.eval_spec else None


def attempt(run: Run, float_layers: tuple[str, ...], label: str = "") -> tuple[Any, dict, dict | None]:
    """lower -> parity -> eval, with these layers kept in float (the fallback calls it again with more)."""
    cfg, tmp = run.cfg, run.tmp
    with run.stage("lower", f"{cfg.target} {run.precision}{label}") as note:
        names = ("logits",) if len(run.reference) == 1 else tuple(f"output_{i}" for i in range(len(run.reference)))
        options = LowerOptions(precision=run.precision, output_names=names,
                               calibration=run.calib.x if run.calib is not None else None,
                               float_layers=float_layers, io_dtype=cfg.io_dtype)
        _clear_model_files(tmp)
        try:
            lowered = run.target.lower(run.program, run.example, options, tmp)
        except (EffaiError, OSError):
            raise
        except Exception as e:
            others = {n: t for n, t in TARGETS.items() if n != cfg.target and t.available()[0]}

            def probe(op: str) -> dict[str, bool] | None:
                from effai.export.op_probe import targets_taking

                return targets_taking(run.model, run.example, op, others)

            raise lowering_error(cfg.target, e, run.log, list(others), probe) from e
        note["detail"] = f"{lowered.model_file} {_size_mb(tmp / lowered.model_file):.2f} MB"
        d = lowered.details.get("delegation")
        if d:
            outside = sum(n for op, n in d["non_delegated_ops"].items() if op != "getitem")
            note["detail"] += (f", {d['partitions']} XNNPACK partition(s), {d['delegated_nodes']} ops delegated, "
                               f"{outside} outside")
    with run.stage("parity") as note:
        parity = _parity(run.target, tmp, lowered, cfg, run.precision, run.inputs, run.reference, run.shape,
                         run.sample_names)
        note["detail"] = _parity_line(parity)
    accuracy = None
    if run.eval_spec:
        with run.stage("eval", run.eval_spec) as note:
            a = accuracy = _accuracy(run.evaluation, run.target, tmp, lowered, cfg, run.shape[0])
            note["detail"] = (f"top-1 torch {a['torch']['top1']:.2%}, artifact "
                              + (f"{a['artifact']['top1']:.2%} ({a['status']})" if "artifact" in a
                                 else f"not-run ({a['reason']})") + f" on {a['samples']} images")
    return lowered, parity, accuracy


def metadata_stage(run: Run, lowered: Any, labels: list[str]) -> dict[str, Any]:
    """The model's description inside the model file itself (outputs checked bit-identical where a runtime runs)."""
    with run.stage("metadata", run.cfg.target) as note:
        info = metadata.describe(run.card, run.loaded.weights.sha256, run.loaded.random_init,
                                 run.card.preprocessing(), labels)
        native = metadata.embed(run.target, run.tmp, lowered, info,
                                run.inputs[: run.shape[0]] if run.cfg.verify else None)
        note["detail"] = metadata.summary(native)
        if native.get("skipped"):
            run.warnings.append(f"{run.cfg.target} metadata and labels were not embedded in the model file: "
                                f"{native['skipped']}")
    return native


def manifest_stage(run: Run, lowered: Any, parity: dict[str, Any], accuracy: dict[str, Any] | None,
                   native: dict[str, Any], labels: list[str], quantization: dict[str, Any] | None) -> dict[str, Any]:
    """parity.npz (the inputs' photos and torch's outputs, for `effai verify`) and manifest.json over every file."""
    cfg, card, loaded = run.cfg, run.card, run.loaded
    with run.stage("manifest") as note:
        np.savez_compressed(run.tmp / manifest_io.PARITY_DATA, photos_u8=run.photos,
                            **{f"reference_{i}": r for i, r in enumerate(run.reference)})
        manifest = manifest_io.build(
            model={"name": card.name, "family": card.family, "source": card.source,
                   "weights": loaded.weights.source, "weights_sha256": loaded.weights.sha256,
                   "random_init": loaded.random_init, "weights_license": card.weights_license,
                   "description": card.description},
            target=cfg.target, precision=run.precision, status=_status(parity, accuracy), quantization=quantization,
            warnings=run.warnings, runtime_settings=runtime_settings(), lowered=lowered,
            preprocessing=card.preprocessing(), labels=labels, native_metadata=native, fold=run.report.to_dict(),
            parity={**parity, "samples": len(run.sample_names), "sample_names": run.sample_names,
                    "data": manifest_io.PARITY_DATA, "noise_seed": cfg.seed, "n_photos": int(run.photos.shape[0]),
                    "batch": run.shape[0]},
            accuracy=accuracy, toolchain=toolchain.versions(),
            export_config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            timings=run.timings)
        manifest = manifest_io.write(run.tmp, manifest)
        note["detail"] = f"{len(manifest['files'])} files hashed"
    return manifest


def _labels(run: Run) -> list[str]:
    labels = zoo.labels(run.card) if run.card.num_classes else []
    if not labels and run.reference and run.reference[0].ndim == 2:
        labels = [f"class_{i}" for i in range(run.reference[0].shape[1])]
    return labels


def _quantization(run: Run, prec: Any, lowered: Any, fallback: Any) -> dict[str, Any] | None:
    if not prec.quantized:
        return None
    calib = run.calib
    return {"precision": run.precision, "description": prec.description, **lowered.details.get("quantization", {}),
            "calibration": calib.to_dict() if calib is not None and prec.needs_calibration else None,
            "fallback": fallback}


def _coverage_warning(run: Run, lowered: Any) -> list[str]:
    """int8-dynamic takes Linear layers only on most runtimes: on a CNN it quantizes next to nothing. Say how many
    of the model's weight layers it took (the target's own count), and what to use instead."""
    done = lowered.details.get("quantization", {}).get("layers_quantized")
    said = any(w.startswith("int8-dynamic quantized") for w in lowered.details.get("warnings", []))
    if run.precision != "int8-dynamic" or not isinstance(done, int) or said:     # onnx counts its own graph
        return []
    convs = sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in run.model.modules())
    total = convs + sum(isinstance(m, torch.nn.Linear) for m in run.model.modules())
    if convs == 0 or total == 0 or done >= total:
        return []
    return [f"int8-dynamic quantized {done} of {total} Conv/Linear layers ({run.cfg.target} quantizes Linear layers "
            f"dynamically and leaves the {convs} convolutions fp32): for a CNN use -q int8 (static, calibrated) or "
            "-q int8-weight"]


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
