"""LiteRT per-operator profile, by isolation: every operator of the .tflite is cut out into a one-operator model
(its constant inputs kept, its other inputs made model inputs) and timed alone in ai_edge_litert's Interpreter at
the same thread count, with the same default XNNPACK delegate the whole model gets.

Why not LiteRT's own op profiler: the pip wheel's Interpreter exposes none (its wrapper has no profiler hooks); the
per-op profiler LiteRT documents is the C++ `benchmark_model --enable_op_profiling=true` (tflite/tools/benchmark),
which the wheel does not ship. Isolation measures each operator's own kernel (plus one invoke's overhead, a few
microseconds, measured on an empty run and subtracted); it cannot see cache effects between neighbouring operators,
so the sum of the rows is compared with the whole model's median in the profile (`wall_ms`).

Module names: litert-torch names each operator's output tensor after the torch module path that produced it
("pkg.GhostNetV3/torch.nn.modules.container.Sequential_blocks/..._0/...Conv2d_conv_stem;2"): parsed into
"blocks.0....conv_stem". FLOPs from the flatbuffer's shapes: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED,
BATCH_MATMUL, TRANSPOSE_CONV.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from effai.device_bench.profile.base import OpRow, Profile, median
from effai.errors import UsageError


def module_name(tensor_name: str) -> str:
    """litert-torch's scoped tensor name -> the torch module path ("" when the name carries none)."""
    head = tensor_name.split(";")[0]
    parts = head.split("/")
    if len(parts) < 2:
        return ""
    attrs = []
    for seg in parts[1:]:                       # parts[0] is the root module's class
        cls_and_attr = seg.rsplit(".", 1)[-1]
        m = re.match(r"^[A-Za-z0-9]+_(.+)$", cls_and_attr)
        if not m:
            return ".".join(attrs)
        attrs.append(m.group(1))
    return ".".join(attrs)


def _op_flops(kind: str, ins: list[list[int] | None], outs: list[list[int] | None]) -> float | None:
    out = outs[0] if outs else None
    if not out or min(out) <= 0:
        return None
    n_out = float(np.prod(out))
    w = ins[1] if len(ins) > 1 else None
    if kind == "CONV_2D" and w and len(w) == 4:
        return 2.0 * n_out * w[1] * w[2] * w[3]
    if kind == "DEPTHWISE_CONV_2D" and w and len(w) == 4:
        return 2.0 * n_out * w[1] * w[2]
    if kind == "FULLY_CONNECTED" and w and len(w) == 2:
        return 2.0 * n_out * w[1]
    if kind == "BATCH_MATMUL" and ins and ins[0]:
        return 2.0 * n_out * ins[0][-1]
    if kind == "TRANSPOSE_CONV" and len(ins) > 2 and ins[1] and ins[2]:
        w = ins[1]
        return 2.0 * float(np.prod(ins[2])) * w[0] * w[1] * w[2]
    return None


def _names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as fb

    return {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _single_op_model(model: Any, sub: Any, op: Any) -> bytes | None:
    """The one-operator model around `op` (None when it has no output to compute)."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    used = [i for i in list(op.inputs or []) + list(op.outputs or []) if i >= 0]
    remap: dict[int, int] = {}
    tensors, buffers, inputs = [], [fb.BufferT()], []
    for i in used:
        if i in remap:
            continue
        t = copy.copy(sub.tensors[i])
        buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
        const = buf is not None and buf.data is not None and len(buf.data) > 0
        if const:
            t.buffer = len(buffers)
            buffers.append(buf)
        else:
            t.buffer = 0
            if i not in (op.outputs or []):
                inputs.append(len(tensors))
        remap[i] = len(tensors)
        tensors.append(t)
    outputs = [remap[i] for i in (op.outputs or []) if i >= 0]
    if not outputs:
        return None
    new_op = copy.copy(op)
    new_op.inputs = [remap[i] if i >= 0 else -1 for i in (op.inputs or [])]
    new_op.outputs = outputs
    new_op.intermediates = []
    g = fb.SubGraphT()
    g.tensors, g.inputs, g.outputs, g.operators, g.name = tensors, inputs, outputs, [new_op], b"op"
    m = fb.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers = model.version, model.operatorCodes, [g], buffers
    m.description = b"effai profile: one operator"
    return bytes(fu.convert_object_to_bytearray(m))


def _time(interp_cls: Any, content: bytes, threads: int, warmup: int, runs: int, seed: int) -> float:
    interp = interp_cls(model_content=content, num_threads=int(threads))
    interp.allocate_tensors()
    rng = np.random.default_rng(seed)
    for d in interp.get_input_details():
        dt = np.dtype(d["dtype"])
        shape = [int(s) for s in d["shape"]]
        if dt.kind == "f":
            x = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            x = np.zeros(shape, dt)
        else:
            x = np.zeros(shape, dt)    # integer inputs (indices, shapes) stay valid at 0
        interp.set_tensor(d["index"], x)
    invoke = interp.invoke
    for _ in range(warmup):
        invoke()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        invoke()
        ts.append((time.perf_counter() - t0) * 1e3)
    return median(ts)


def profile(model_file: Path, inputs: list[np.ndarray], threads: int, warmup: int, runs: int) -> Profile:
    try:
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_litert.tools import flatbuffer_utils as fu
        from ai_edge_litert import __version__ as litert_version  # type: ignore[attr-defined]
    except ImportError:
        try:
            from ai_edge_litert.interpreter import Interpreter
            from ai_edge_litert.tools import flatbuffer_utils as fu
            litert_version = "?"
        except ImportError:
            raise UsageError("profiling a .tflite needs ai-edge-litert (its Interpreter and flatbuffer tools); "
                             "pip install ai-edge-litert") from None
    raw = Path(model_file).read_bytes()
    try:
        model = fu.read_model_from_bytearray(bytearray(raw))
    except Exception as e:
        raise UsageError(f"{model_file} cannot be read as a TFLite flatbuffer ({type(e).__name__}); pass an intact "
                         ".tflite") from None
    if not model.subgraphs:
        raise UsageError(f"{model_file} has no subgraph to profile")
    names = _names()
    sub = model.subgraphs[0]

    def shape(i: int) -> list[int] | None:
        return [int(s) for s in sub.tensors[i].shape] if i >= 0 and sub.tensors[i].shape is not None else None

    # the whole model, same settings: the reference the isolated rows are compared with
    whole = Interpreter(model_path=str(model_file), num_threads=int(threads))
    whole.allocate_tensors()
    for d, x in zip(whole.get_input_details(), inputs):
        whole.set_tensor(d["index"], x)
    for _ in range(max(1, warmup)):
        whole.invoke()
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        whole.invoke()
        walls.append((time.perf_counter() - t0) * 1e3)
    del whole
    rows: list[OpRow] = []
    overhead = None
    skipped = 0
    for k, op in enumerate(sub.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(fu.get_builtin_code_from_operator_code(code), "CUSTOM")
        if kind == "CUSTOM" and code.customCode:
            kind = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
        content = _single_op_model(model, sub, op)
        if content is None:
            continue
        try:
            t = _time(Interpreter, content, threads, max(1, warmup // 2), runs, k)
        except Exception:
            skipped += 1
            continue
        if overhead is None:
            overhead = _empty_invoke_ms(Interpreter, content, threads, runs)
        out_name = sub.tensors[op.outputs[0]].name if op.outputs is not None and len(op.outputs) else b""
        out_name = out_name.decode("utf-8", "replace") if isinstance(out_name, bytes) else str(out_name or "")
        ins = [shape(i) for i in (op.inputs or [])]
        outs = [shape(i) for i in (op.outputs or [])]
        rows.append(OpRow(name=f"{kind}#{k}", kind=kind, time_ms=max(0.0, t - (overhead or 0.0)),
                          module=module_name(out_name), flops=_op_flops(kind, ins, outs)))
    if not rows:
        raise UsageError(f"{model_file}: no operator could be timed in isolation")
    weights = sum(len(b.data) for b in model.buffers if b.data is not None)
    notes = [f"per-operator times by isolation (each operator alone, {runs} runs, median, minus {overhead or 0:.4f} "
             "ms of invoke overhead); their sum is not the whole model's time: see wall_ms"]
    if skipped:
        notes.append(f"{skipped} operator(s) could not run alone (state, control flow): not in the table")
    return Profile(target="tflite", runtime=f"ai_edge_litert {litert_version}",
                   method="LiteRT Interpreter, operator isolation (the wheel has no op profiler)", threads=threads,
                   runs=runs, total_ms=0.0, rows=tuple(rows), wall_ms=median(walls), weight_bytes=int(weights),
                   notes=tuple(notes))


def _empty_invoke_ms(interp_cls: Any, content: bytes, threads: int, runs: int) -> float:
    """Overhead of one invoke() call from Python: a trivial model's median (its one op copies a few bytes)."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    t = fb.TensorT()
    t.shape, t.type, t.buffer, t.name = [1], fb.TensorType.FLOAT32, 0, b"x"
    o = fb.TensorT()
    o.shape, o.type, o.buffer, o.name = [1], fb.TensorType.FLOAT32, 0, b"y"
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.RELU
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    g = fb.SubGraphT()
    g.tensors, g.inputs, g.outputs, g.operators = [t, o], [0], [1], [op]
    m = fb.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers = 3, [code], [g], [fb.BufferT()]
    return _time(interp_cls, bytes(fu.convert_object_to_bytearray(m)), threads, 3, max(runs, 20), 0)


def model_flops(model_file: Path) -> float | None:
    """The .tflite's convolution / matmul FLOPs (2 x MACs) from its shapes, without running it."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(Path(model_file).read_bytes()))
    names = _names()
    sub = model.subgraphs[0]

    def shape(i: int) -> list[int] | None:
        return [int(s) for s in sub.tensors[i].shape] if i >= 0 and sub.tensors[i].shape is not None else None

    total = 0.0
    for op in sub.operators or []:
        kind = names.get(fu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex]), "")
        f = _op_flops(kind, [shape(i) for i in (op.inputs or [])], [shape(i) for i in (op.outputs or [])])
        total += f or 0.0
    return total or None
