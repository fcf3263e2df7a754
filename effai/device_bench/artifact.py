"""An effai artifact directory as bench sees it: the manifest, the model file, and a hash check before timing.

Bench reads only files on disk (no torch, no effai.export), so a corrupted or hand-edited artifact is caught here,
with the file named, before any runner copies it to a device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effai.errors import UsageError
from effai.export import manifest as manifest_io   # torch-free, like this module
from effai.files import MAX_JSON_BYTES, loads_json, read_json

MANIFEST = "manifest.json"
TARGETS = ("executorch", "tflite", "onnx", "coreml")


@dataclass(frozen=True)
class Artifact:
    """One exported artifact: its directory, parsed manifest and model file (a file, or a .mlpackage directory)."""

    dir: Path
    manifest: dict[str, Any] = field(repr=False, compare=False)
    model_file: Path
    target: str
    precision: str
    model_name: str
    manifest_sha256: str = ""

    def describe(self) -> dict[str, Any]:
        """What a BenchRecord stores about the artifact (and what baselines match on: model, target, precision)."""
        return {"path": str(self.dir), "model": self.model_name, "target": self.target, "precision": self.precision,
                "model_file": self.manifest.get("model_file"), "manifest_sha256": self.manifest_sha256,
                "bytes": model_bytes(self.manifest), "inputs": self.manifest.get("inputs", [])}


def model_bytes(manifest: dict[str, Any]) -> int:
    """Size of the model file (all files under a .mlpackage) as the manifest lists it."""
    mf = str(manifest.get("model_file", ""))
    return sum(int(f.get("bytes", 0)) for f in manifest.get("files", [])
               if f.get("path") == mf or str(f.get("path", "")).startswith(mf + "/"))


def file_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Listed files outside the directory, missing, or with a changed size or sha256, and files the directory
    holds that the manifest does not list; empty when all match (effai.export.manifest.check_files)."""
    return manifest_io.check_files(root, manifest)


def load(path: Path | str, check_hashes: bool = True) -> Artifact:
    """Read and check an artifact directory; UsageError naming the problem and the fix for anything wrong."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"artifact directory not found: {root}; pass a directory written by effai export")
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory; pass an artifact directory written by effai export")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UsageError(f"{root} has no {MANIFEST}, so it is not an effai artifact; export one with: effai export "
                         "MODEL --target T --out DIR")
    try:
        raw = mpath.read_bytes() if mpath.stat().st_size <= MAX_JSON_BYTES else b""
    except OSError as e:
        raise UsageError(f"cannot read {mpath}: {e.strerror or e}") from None
    manifest = loads_json(raw, str(mpath)) if raw else read_json(mpath)   # read_json names the size limit
    if not isinstance(manifest, dict):
        raise UsageError(f"{mpath} is not a JSON object; re-export the artifact")
    missing = [k for k in ("target", "model_file", "inputs") if k not in manifest]
    if missing:
        raise UsageError(f"{mpath} lacks {', '.join(missing)}; re-export the artifact")
    if manifest["target"] not in TARGETS:
        raise UsageError(f"{mpath}: unknown target '{str(manifest['target'])[:40]}' (bench runs "
                         f"{', '.join(TARGETS)}); re-export the artifact")
    model_file = manifest_io.model_file(root, manifest)   # inside the directory and hashed, or refused
    if not model_file.exists():
        raise UsageError(f"{root}: the model file {manifest['model_file']} named by the manifest is missing; "
                         "re-export the artifact")
    if check_hashes:
        problems = file_problems(root, manifest)
        if problems:
            raise UsageError(f"artifact {root} failed its hash check: {'; '.join(problems[:3])}"
                             f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; re-export it, "
                             f"or see what changed with: effai verify {root}")
    model = manifest.get("model") or {}
    return Artifact(dir=root.resolve(), manifest=manifest, model_file=model_file.resolve(),
                    target=str(manifest["target"]), precision=str(manifest.get("precision", "unknown")),
                    model_name=str(model.get("name", root.name)) if isinstance(model, dict) else str(model),
                    manifest_sha256=hashlib.sha256(raw).hexdigest())


# --- plain model files (no manifest) -------------------------------------------------------------------------

PLAIN_NOTE = "plain model file: no manifest, parity and accuracy not checked"
SUFFIXES = {".onnx": "onnx", ".tflite": "tflite", ".pte": "executorch", ".mlpackage": "coreml"}
_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
                "tensor(int64)": "int64", "tensor(bool)": "bool"}


def is_plain_file(path: Path | str) -> bool:
    """True for a path that is a model file (or a .mlpackage directory) rather than an artifact directory."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return False                       # an artifact directory, whatever its name ends with
    return p.suffix.lower() in SUFFIXES or p.is_file()


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """--input-shape values `[NAME=]D,D,...` -> {name or "": shape}; UsageError for anything else."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise UsageError(f"--input-shape '{spec}' must be [NAME=]D,D,... with positive sizes, like 1,3,224,224")
        shapes[name.strip()] = shape
    return shapes


def _fill(path: Path, name: str, dims: list[Any], shapes: dict[str, tuple[int, ...]]) -> list[int]:
    """Static dims as they are; a dynamic one (None, a symbol, -1) from --input-shape, or a UsageError."""
    if all(isinstance(d, int) and d > 0 for d in dims):
        return [int(d) for d in dims]
    given = shapes.get(name, shapes.get(""))
    if given is None:
        raise UsageError(f"{path}: input '{name}' has dynamic dims {[d if isinstance(d, int) and d > 0 else '?' for d in dims]}; "
                         f"give its shape with --input-shape {name}=1,3,224,224 (the sizes to time)")
    if len(given) != len(dims) or any(isinstance(d, int) and d > 0 and d != g for d, g in zip(dims, given)):
        raise UsageError(f"{path}: --input-shape {','.join(map(str, given))} does not fit input '{name}' "
                         f"{[d if isinstance(d, int) and d > 0 else '?' for d in dims]}; keep its static sizes")
    return list(given)


def _unknown_names(path: Path, shapes: dict[str, tuple[int, ...]], names: list[str]) -> None:
    """UsageError for an --input-shape NAME= that is none of the file's inputs (it would be ignored silently)."""
    unknown = [n for n in shapes if n and n not in names]
    if unknown:
        raise UsageError(f"{path}: --input-shape names input '{unknown[0]}', which the file does not have; its "
                         f"inputs: {', '.join(names)}")


def _tflite_resize(path: Path, interp: Any, detail: dict[str, Any], given: list[int]) -> list[int]:
    """Resize one LiteRT input to `given` (Interpreter.resize_tensor_input, strict: only the dims the model's
    shape_signature marks -1 may change); UsageError when the file fixes the dims asked to change."""
    name = str(detail["name"])
    sig = [int(x) for x in detail.get("shape_signature", [])] or [int(x) for x in detail["shape"]]
    shown = [d if d > 0 else "?" for d in sig]
    if len(given) != len(sig) or any(d > 0 and d != g for d, g in zip(sig, given)):
        fixed = "the file fixes every dim" if all(d > 0 for d in sig) else "only its ? dims can change"
        raise UsageError(f"{path}: --input-shape {','.join(map(str, given))} does not fit input '{name}' {shown} "
                         f"({fixed}); re-export the model at that size, or omit --input-shape")
    try:
        interp.resize_tensor_input(detail["index"], given, strict=True)
    except Exception as e:
        detail_text = " ".join(str(e).split())[:200]
        raise UsageError(f"{path}: LiteRT cannot resize input '{name}' to {given} ({detail_text}); re-export the "
                         "model at that size") from None
    return list(given)


def _fixed_shapes(path: Path, kind: str, specs: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]]) -> None:
    """UsageError when --input-shape asks a format whose input sizes are fixed in the file (ExecuTorch, Core ML as
    effai exports them) for other sizes than the file's."""
    _unknown_names(path, shapes, [s["name"] for s in specs])
    for s in specs:
        given = shapes.get(s["name"], shapes.get(""))
        if given is not None and list(given) != list(s["shape"]):
            raise UsageError(f"{path}: {kind} has its input sizes fixed in the file ('{s['name']}' is "
                             f"{','.join(map(str, s['shape']))}); --input-shape cannot change them: re-export the "
                             "model at that size, or omit --input-shape")


def _corrupt(path: Path, kind: str, e: BaseException) -> UsageError:
    detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    return UsageError(f"{path} cannot be read as {kind} ({detail}); pass an intact model file")


def read_inputs(path: Path, target: str, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Input specs (name, shape, dtype[, quantization]) read from the model file itself, in its runtime's own
    loader: onnxruntime's session inputs, LiteRT's input details, ExecuTorch's method meta, Core ML's spec."""
    if target == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError(f"{path}: reading an .onnx file needs onnxruntime; pip install onnxruntime") from None
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise _corrupt(path, "an ONNX model", e) from None
        _unknown_names(path, shapes, [i.name for i in sess.get_inputs()])
        specs = []
        for i in sess.get_inputs():
            if i.type not in _ONNX_DTYPES:
                raise UsageError(f"{path}: input '{i.name}' is {i.type}, which bench cannot generate "
                                 f"(it feeds {', '.join(_ONNX_DTYPES)})")
            specs.append({"name": i.name, "shape": _fill(path, i.name, list(i.shape), shapes),
                          "dtype": _ONNX_DTYPES[i.type]})
        return specs
    if target == "tflite":
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
            except ImportError:
                raise UsageError(f"{path}: reading a .tflite file needs pip install ai-edge-litert") from None
        try:
            interp = Interpreter(model_path=str(path))
            details = interp.get_input_details()
        except Exception as e:
            raise _corrupt(path, "a TFLite model", e) from None
        _unknown_names(path, shapes, [str(d["name"]) for d in details])
        specs = []
        for d in details:   # the interpreter runs its allocated shape; a -1 in shape_signature is allocated as 1
            spec: dict[str, Any] = {"name": str(d["name"]), "shape": [int(x) for x in d["shape"]],
                                    "dtype": __import__("numpy").dtype(d["dtype"]).name}
            given = shapes.get(spec["name"], shapes.get(""))
            if given is not None and list(given) != spec["shape"]:
                spec["shape"] = _tflite_resize(path, interp, d, list(given))
                spec["resized"] = True     # runners resize this input before allocating (LiteRT's own resize)
            scale, zp = d.get("quantization", (0.0, 0))
            if scale:
                spec["quantization"] = {"scale": float(scale), "zero_point": int(zp)}
            specs.append(spec)
        if any(s.get("resized") for s in specs):
            try:
                interp.allocate_tensors()
            except Exception as e:
                detail = " ".join(str(e).split())[:200]
                raise UsageError(f"{path}: LiteRT cannot run the model at --input-shape "
                                 f"{' '.join(','.join(map(str, s['shape'])) for s in specs)} ({detail}); "
                                 "re-export it at that size") from None
        return specs
    if target == "executorch":
        try:
            from executorch.runtime import Runtime
        except ImportError:
            raise UsageError(f"{path}: reading a .pte file needs pip install executorch") from None
        _check_pte_header(path)   # ExecuTorch's C++ loader aborts the process on some malformed files
        try:
            meta = Runtime.get().load_program(str(path)).metadata("forward")
            metas = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
        except Exception as e:
            raise _corrupt(path, "an ExecuTorch program with a forward method", e) from None
        specs = []
        for i, m in enumerate(metas):
            code = m.dtype()   # c10::ScalarType: an int, or an enum whose name is the C++ one
            code = int(code) if isinstance(code, int) or str(code).isdigit() else str(code).split(".")[-1].lower()
            dtype = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                     7: "float64", 11: "bool", "byte": "uint8", "char": "int8", "short": "int16", "int": "int32",
                     "long": "int64", "half": "float16", "float": "float32", "double": "float64",
                     "bool": "bool"}.get(code)
            if dtype is None:
                raise UsageError(f"{path}: input {i} has ExecuTorch dtype {code}, which bench cannot generate")
            specs.append({"name": f"input_{i}", "shape": [int(s) for s in m.sizes()], "dtype": dtype})
        _fixed_shapes(path, "an ExecuTorch program", specs, shapes)
        return specs
    if target == "coreml":
        try:
            import coremltools as ct
            spec_pb = ct.utils.load_spec(str(path))
        except ImportError:
            raise UsageError(f"{path}: reading a .mlpackage needs pip install coremltools") from None
        except Exception as e:
            raise _corrupt(path, "a Core ML package", e) from None
        specs = []
        for i in spec_pb.description.input:
            arr = i.type.multiArrayType
            dtype = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}.get(arr.dataType,
                                                                                               "float32")
            dims = [int(s) for s in arr.shape]
            specs.append({"name": i.name, "shape": dims or _fill(path, i.name, [None], shapes),
                          "dtype": dtype})
        _fixed_shapes(path, "a Core ML package", specs, shapes)
        return specs
    raise UsageError(f"unknown target {target}")


def _check_pte_header(path: Path) -> None:
    """UsageError unless `path` starts like an ExecuTorch program: flatbuffer identifier "ET.." at byte 4 and, when
    the extended header "eh00" follows, a file at least as long as its program and segment offsets. A file with a
    good header and a damaged body still reaches ExecuTorch's own loader (which may abort on it)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(32)
    size = path.stat().st_size
    if len(head) < 8 or head[4:6] != b"ET":
        raise UsageError(f"{path} cannot be read as an ExecuTorch program (no 'ET' file identifier at byte 4); "
                         "pass an intact .pte file")
    if head[8:12] == b"eh00" and len(head) >= 32:
        program_size, segment_base = struct.unpack_from("<QQ", head, 16)
        if program_size > size or segment_base > size:
            raise UsageError(f"{path} cannot be read as an ExecuTorch program (truncated: {size} bytes, its header "
                             f"says {max(program_size, segment_base)}+); pass an intact .pte file")


def load_file(path: Path | str, stage: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> Artifact:
    """A plain model file as an Artifact: its inputs read from the file, a manifest synthesized in `stage` (a temp
    dir) next to a link (or copy) of the file, so every runner times it with the same code as an artifact
    directory. The record's artifact says PLAIN_NOTE; no parity or accuracy is checked."""
    import os
    import shutil

    src = Path(path)
    target = SUFFIXES.get(src.suffix.lower())
    if target is None:
        raise UsageError(f"{src}: unknown model file type '{src.suffix or '(none)'}'; bench takes artifact "
                         f"directories or plain {', '.join(SUFFIXES)} files")
    if not src.exists():
        raise UsageError(f"model file not found: {src}")
    if target == "coreml" and not src.is_dir():
        raise UsageError(f"{src} is not a .mlpackage directory; pass the package folder Core ML writes")
    if target != "coreml" and not src.is_file():
        raise UsageError(f"{src} is not a regular file; pass a {src.suffix} model file")
    from effai.export.quiet import runtime_quiet

    with runtime_quiet():   # runtimes print on load (XNNPACK, coremltools' import checks): not to the terminal
        inputs = read_inputs(src, target, shapes or {})
    stage.mkdir(parents=True, exist_ok=True)
    linked = stage / src.name
    if src.is_dir():
        shutil.copytree(src, linked, symlinks=False)
        nbytes = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    else:
        try:
            os.link(src, linked)
        except OSError:
            shutil.copyfile(src, linked)
        nbytes = src.stat().st_size
    manifest = {"schema": "effai.manifest/1", "target": target, "model_file": src.name, "inputs": inputs,
                "precision": "unknown", "model": {"name": src.stem}, "plain_file": True, "note": PLAIN_NOTE,
                "files": [{"path": src.name, "bytes": nbytes}]}
    import json

    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1))
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if src.is_file() else ""
    return PlainArtifact(dir=stage.resolve(), manifest=manifest, model_file=linked.resolve(), target=target,
                         precision="unknown", model_name=src.stem, manifest_sha256="", source=src.resolve(),
                         sha256=digest)


@dataclass(frozen=True)
class PlainArtifact(Artifact):
    """A plain model file staged as an artifact (see load_file); describe() names the file, not the stage."""

    source: Path = Path()
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.source), "model_file": self.source.name,
                "plain_file": True, "note": PLAIN_NOTE, "sha256": self.sha256}
