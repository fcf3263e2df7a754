"""Evaluate a Core ML ML program without the Core ML runtime: op by op in torch on the CPU (Linux included).

Used to measure activation ranges for Core ML W8A8 calibration (coremltools measures them with MLModel.predict,
which exists only on macOS) and by `simulate()`, a Linux check of a saved package's compressed numerics. It is not
the runtime: kernels and fp16 accumulation differ slightly, so it never stands in for parity.
Semantics per coremltools.converters.mil.mil.ops.defs (iOS15-iOS18).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effai.errors import EffaiError


class NeedsRuntime(Exception):
    """effai cannot evaluate this ML program faithfully without the Core ML runtime."""


def simulate(path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """A saved package's outputs for `inputs` (in its input order), computed without the Core ML runtime: a check
    of the compressed numerics on Linux, not the runtime's exact arithmetic (its kernels and fp16 accumulation
    differ slightly).

    coremltools.optimize.coreml.decompress_weights turns each compressed weight (constexpr_* op) back into the
    float const the runtime materializes when it loads the model; MilEvaluator then runs the program, int8
    quantize/dequantize pairs included. EffaiError for programs with an op the evaluator lacks."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    mlmodel = cto.decompress_weights(ct.models.MLModel(str(path), skip_model_load=True))
    fn = mlmodel._mil_program.functions["main"]
    names = [f.name for f in mlmodel.get_spec().description.input]
    try:
        env = MilEvaluator(fn).run(dict(zip(names, inputs)))
    except NeedsRuntime as e:
        raise EffaiError(f"cannot compute {path.name} without the Core ML runtime: {e}") from None
    return [env[v.name].numpy() for v in fn.outputs if v.name in env]   # tensors: not a classifier's label/dict


SKIPPED = ("const", "classify")   # consts are read as values; classify only maps scores to labels (no tensor out)


class MilEvaluator:
    """Runs a coremltools pymil Function (an in-memory ML program without constexpr ops: as converted, or after
    decompress_weights) with torch on the CPU, op by op, and returns every tensor by name. Float tensors compute in
    fp32 and are rounded to fp16 where the program stores fp16, as the runtime stores them; every result's shape is
    checked against the program's. Semantics per coremltools.converters.mil.mil.ops.defs (iOS15-iOS18)."""

    def __init__(self, fn: Any):
        self.fn = fn
        if not _MIL_OPS:
            _MIL_OPS.update(_mil_ops())
        missing = sorted({op.op_type for op in fn.operations
                          if op.op_type not in SKIPPED and (op.op_type not in _MIL_OPS or op.blocks)})
        if missing:
            raise NeedsRuntime(f"effai's Linux evaluator of Core ML programs lacks the op(s) {', '.join(missing)}")
        self.consts: dict[str, Any] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Every tensor of the program, by name, for these inputs (by input name)."""
        import torch

        env: dict[str, Any] = {name: torch.from_numpy(np.ascontiguousarray(feeds[name], np.float32))
                               for name in self.fn.inputs}
        with torch.no_grad():
            for op in self.fn.operations:
                if op.op_type in SKIPPED:
                    continue
                args = {k: tuple(self._value(u, env) for u in v) if isinstance(v, (list, tuple))
                        else self._value(v, env) for k, v in op.inputs.items()}
                out = _MIL_OPS[op.op_type](args, op)
                for var, t in zip(op.outputs, out if isinstance(out, (list, tuple)) else (out,)):
                    env[var.name] = _conform(var, t, op)
        return env

    def _value(self, var: Any, env: dict[str, Any]) -> Any:
        import torch

        if var.name in env:
            return env[var.name]
        if var.name not in self.consts:
            val = var.val
            if val is None:
                raise NeedsRuntime(f"tensor '{var.name}' has no value to evaluate")
            if isinstance(val, np.ndarray):
                val = torch.from_numpy(val.astype(np.float32) if val.dtype.kind == "f" else np.ascontiguousarray(val))
            elif isinstance(val, np.generic):
                val = val.item()
            self.consts[var.name] = val
        return self.consts[var.name]


def _conform(var: Any, t: Any, op: Any) -> Any:
    """`t` as the program holds `var`: fp16 storage rounding, and the declared static shape (else NeedsRuntime)."""
    import torch
    from coremltools.converters.mil.mil import types

    t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    shape = tuple(var.shape) if var.shape is not None else None
    if shape is not None and all(isinstance(d, (int, np.integer)) for d in shape) and tuple(t.shape) != shape:
        raise NeedsRuntime(f"effai's evaluation of {op.op_type} '{op.name}' gave shape {tuple(t.shape)}, the "
                            f"program declares {shape}")
    if var.dtype == types.fp16:
        t = t.to(torch.float16).to(torch.float32)
    elif types.is_float(var.dtype):
        t = t.to(torch.float32)
    return t


# ---- the ML program ops the evaluator knows (coremltools.converters.mil.mil.ops.defs, iOS15-iOS18 semantics) ----

def _t(v: Any) -> Any:
    import torch

    if isinstance(v, torch.Tensor):
        return v
    return torch.as_tensor(v, dtype=torch.float32 if isinstance(v, float) else None)


def _ints(v: Any) -> list[int]:
    import torch

    return [int(i) for i in np.atleast_1d(v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).ravel()]


def _bools(v: Any, n: int) -> list[bool]:
    import torch

    if v is None:
        return [False] * n
    return [bool(b) for b in np.atleast_1d(v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).ravel()]


def _declared_shape(op: Any) -> tuple[int, ...]:
    shape = op.outputs[0].shape
    if not all(isinstance(d, (int, np.integer)) for d in shape):
        raise NeedsRuntime(f"{op.op_type} '{op.name}' has a symbolic output shape {shape}")
    return tuple(int(d) for d in shape)


def _spatial_pads(size: Any, kernel: list[int], strides: list[int], dilations: list[int], pad_type: str,
                  pad: Any) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis for MIL's pad_type: valid, custom ([b0, e0, b1, e1, ...]), same (the
    odd pixel at the end) or same_lower (at the beginning); same keeps ceil(size / stride) outputs."""
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = _ints(pad) if pad is not None else [0] * 2 * n
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for s, k, st, d in zip(size, kernel, strides, dilations):
            total = max((math.ceil(int(s) / st) - 1) * st + (k - 1) * d + 1 - int(s), 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise NeedsRuntime(f"pad_type '{pad_type}'")


def _torch_pad(pads: list[tuple[int, int]]) -> list[int]:
    """torch.nn.functional.pad's order: last axis first."""
    return [p for b, e in reversed(pads) for p in (b, e)]


def _conv(a: dict, op: Any) -> Any:
    import torch.nn.functional as F

    x, w = a["x"], a["weight"]
    n = x.dim() - 2
    strides, dil = _ints(a.get("strides", [1] * n)), _ints(a.get("dilations", [1] * n))
    pads = _spatial_pads(x.shape[2:], list(w.shape[2:]), strides, dil, a.get("pad_type", "valid"), a.get("pad"))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(F.pad(x, _torch_pad(pads)), w, a.get("bias"), strides, 0, dil, int(a.get("groups", 1)))


def _pool(kind: str) -> Callable[[dict, Any], Any]:
    def run(a: dict, op: Any) -> Any:
        import torch
        import torch.nn.functional as F

        x, k = a["x"], _ints(a["kernel_sizes"])
        n = len(k)
        s = _ints(a.get("strides", [1] * n))
        pads = _spatial_pads(x.shape[2:], k, s, [1] * n, a.get("pad_type", "valid"), a.get("pad"))
        extra = [(0, 0)] * n   # ceil_mode: a last, partial window
        if a.get("ceil_mode", False):
            lengths = [int(size) + b + e for size, (b, e) in zip(x.shape[2:], pads)]
            extra = [(0, max((math.ceil((ln - ki) / si)) * si + ki - ln, 0)) for ln, ki, si in zip(lengths, k, s)]
        if kind == "max":
            padded = F.pad(F.pad(x, _torch_pad(pads), value=-math.inf), _torch_pad(extra), value=-math.inf)
            return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1](padded, k, s)
        avg = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        include = not a.get("exclude_padding_from_average", False)
        ones = torch.ones((1, 1, *x.shape[2:]))
        count = F.pad(F.pad(ones, _torch_pad(pads), value=1.0 if include else 0.0), _torch_pad(extra))
        return avg(F.pad(F.pad(x, _torch_pad(pads)), _torch_pad(extra)), k, s) / avg(count, k, s)

    return run


def _reduce(fn: Callable) -> Callable[[dict, Any], Any]:
    def run(a: dict, op: Any) -> Any:
        x = a["x"]
        dims = tuple(_ints(a["axes"])) if a.get("axes") is not None else tuple(range(x.dim()))
        return fn(x, dim=dims, keepdim=bool(a.get("keep_dims", False)))

    return run


def _slice_by_index(a: dict, op: Any) -> Any:
    import torch

    x = a["x"]
    r = x.dim()
    begin, end = _ints(a["begin"]), _ints(a["end"])
    stride = _ints(a["stride"]) if a.get("stride") is not None else [1] * r
    bm, em, sm = (_bools(a.get(m), r) for m in ("begin_mask", "end_mask", "squeeze_mask"))
    idx = tuple(begin[i] if sm[i] else slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i])
                for i in range(r))
    return torch.from_numpy(np.ascontiguousarray(x.numpy()[idx]))


def _slice_by_size(a: dict, op: Any) -> Any:
    begin, size = _ints(a["begin"]), _ints(a["size"])
    return a["x"][tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def _concat(a: dict, op: Any) -> Any:
    import torch

    vals = [_t(v) for v in a["values"]]
    axis = int(a["axis"]) % vals[0].dim()
    if a.get("interleave", False):   # out[..., i*N + j] = values[j][..., i]
        return torch.stack(vals, dim=axis + 1).flatten(axis, axis + 1)
    return torch.cat(vals, dim=axis)


def _split(a: dict, op: Any) -> Any:
    import torch

    axis = int(a["axis"])
    return torch.split(a["x"], [int(v.shape[axis]) for v in op.outputs], dim=axis)


def _matmul(a: dict, op: Any) -> Any:
    import torch

    x, y = _t(a["x"]), _t(a["y"])
    if a.get("transpose_x", False) and x.dim() > 1:
        x = x.transpose(-1, -2)
    if a.get("transpose_y", False) and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def _norm(x: Any, dims: tuple[int, ...], eps: float) -> Any:
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def _affine(y: Any, gamma: Any, beta: Any, shape: list[int]) -> Any:
    if gamma is not None:
        y = y * _t(gamma).reshape(shape)
    if beta is not None:
        y = y + _t(beta).reshape(shape)
    return y


def _layer_norm(a: dict, op: Any) -> Any:
    x = a["x"]
    dims = tuple(sorted(d % x.dim() for d in (_ints(a["axes"]) if a.get("axes") is not None else range(x.dim()))))
    y = _norm(x, dims, float(a.get("epsilon", 1e-5)))
    return _affine(y, a.get("gamma"), a.get("beta"), [x.shape[d] if d in dims else 1 for d in range(x.dim())])


def _channel_norm(batch: bool) -> Callable[[dict, Any], Any]:
    def run(a: dict, op: Any) -> Any:
        x = a["x"]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        eps = float(a.get("epsilon", 1e-5))
        if batch:
            y = (x - _t(a["mean"]).reshape(shape)) / (_t(a["variance"]).reshape(shape) + eps).sqrt()
        else:
            y = _norm(x, tuple(range(2, x.dim())), eps)
        return _affine(y, a.get("gamma"), a.get("beta"), shape)

    return run


def _pad(a: dict, op: Any) -> Any:
    import torch.nn.functional as F

    p = _ints(a["pad"])
    pairs = [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]   # (begin, end) of the last len(p)/2 axes
    mode = a.get("mode", "constant")
    if mode == "constant":
        return F.pad(a["x"], _torch_pad(pairs), value=float(a.get("constant_val", 0.0)))
    if mode not in ("reflect", "replicate"):
        raise NeedsRuntime(f"pad mode '{mode}'")
    while len(pairs) > 1 and pairs[0] == (0, 0):   # torch pads at most the last 3 axes in these modes
        pairs.pop(0)
    return F.pad(a["x"], _torch_pad(pairs), mode=mode)


def _resize(mode: str) -> Callable[[dict, Any], Any]:
    def run(a: dict, op: Any) -> Any:
        import torch.nn.functional as F

        size = _declared_shape(op)[2:]
        if mode == "nearest":
            return F.interpolate(a["x"], size=size, mode="nearest")
        if "sampling_mode" in a:   # resize_bilinear
            sampling = a["sampling_mode"]
            if sampling not in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS", "UNALIGN_CORNERS"):
                raise NeedsRuntime(f"resize_bilinear sampling_mode '{sampling}'")
            align = sampling != "UNALIGN_CORNERS"
        else:                      # upsample_bilinear: align_corners (default True), half_pixel_centers (iOS16)
            align = bool(a.get("align_corners", True))
            if not align and not a.get("half_pixel_centers", True):
                raise NeedsRuntime("upsample_bilinear without align_corners or half_pixel_centers")
        return F.interpolate(a["x"], size=size, mode="bilinear", align_corners=align)

    return run


def _gelu(a: dict, op: Any) -> Any:
    import torch
    import torch.nn.functional as F

    mode = a.get("mode", "EXACT")
    if mode == "SIGMOID_APPROXIMATION":
        return a["x"] * torch.sigmoid(1.702 * a["x"])
    return F.gelu(a["x"], approximate="tanh" if mode == "TANH_APPROXIMATION" else "none")


def _prelu(a: dict, op: Any) -> Any:
    import torch

    x = a["x"]
    alpha = _t(a["alpha"]).reshape([1, -1] + [1] * (x.dim() - 2))
    return torch.where(x >= 0, x, alpha * x)


def _cast(a: dict, op: Any) -> Any:
    import torch

    dtypes = {"fp16": torch.float32, "fp32": torch.float32, "fp64": torch.float32, "int32": torch.int32,
              "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
    if a["dtype"] not in dtypes:
        raise NeedsRuntime(f"cast to {a['dtype']}")
    return _t(a["x"]).to(dtypes[a["dtype"]])


def _along(v: Any, axis: Any, rank: int) -> Any:
    """A per-axis 1-D scale or zero point shaped to broadcast along `axis` of a rank-`rank` tensor."""
    t = _t(v).float()
    if t.dim() == 1 and rank > 1 and axis is not None:
        shape = [1] * rank
        shape[int(axis) % rank] = -1
        t = t.reshape(shape)
    return t


def _quantize(a: dict, op: Any) -> Any:
    """MIL quantize (iOS17): clip(round(x / scale) + zero_point) to the int8 / uint8 range."""
    import torch

    ranges = {"int8": (-128, 127, torch.int8), "uint8": (0, 255, torch.uint8)}
    if a["output_dtype"] not in ranges:
        raise NeedsRuntime(f"quantize to {a['output_dtype']}")
    lo, hi, dtype = ranges[a["output_dtype"]]
    x, axis = a["input"], a.get("axis")
    q = torch.round(x / _along(a["scale"], axis, x.dim()))
    if a.get("zero_point") is not None:
        q = q + _along(a["zero_point"], axis, x.dim())
    return q.clamp(lo, hi).to(dtype)


def _dequantize(a: dict, op: Any) -> Any:
    """MIL dequantize (iOS17): (q - zero_point) * scale."""
    q, axis = a["input"].float(), a.get("axis")
    if a.get("zero_point") is not None:
        q = q - _along(a["zero_point"], axis, q.dim())
    return q * _along(a["scale"], axis, q.dim())


def _mil_ops() -> dict[str, Callable[[dict, Any], Any]]:
    """The evaluator's op table: MIL op type -> f(arguments by input name, op) -> tensor or tuple of tensors."""
    import torch
    import torch.nn.functional as F

    def unary(fn: Callable) -> Callable[[dict, Any], Any]:
        return lambda a, op: fn(_t(a["x"]))

    def binary(fn: Callable) -> Callable[[dict, Any], Any]:
        return lambda a, op: fn(_t(a["x"]), _t(a["y"]))

    def f(a: dict, key: str, default: float) -> float:
        return float(a.get(key, default))

    ops: dict[str, Callable[[dict, Any], Any]] = {
        "conv": _conv, "linear": lambda a, op: F.linear(a["x"], _t(a["weight"]), a.get("bias")),
        "matmul": _matmul, "avg_pool": _pool("avg"), "max_pool": _pool("max"),
        "reduce_mean": _reduce(torch.mean), "reduce_sum": _reduce(torch.sum), "reduce_max": _reduce(torch.amax),
        "reduce_min": _reduce(torch.amin), "reduce_l2_norm": _reduce(torch.linalg.vector_norm),
        "reduce_log_sum_exp": _reduce(torch.logsumexp),
        "softmax": lambda a, op: torch.softmax(a["x"], dim=int(a.get("axis", -1))),
        "layer_norm": _layer_norm, "batch_norm": _channel_norm(batch=True), "instance_norm": _channel_norm(False),
        "relu6": lambda a, op: a["x"].clamp(0.0, 6.0),
        "leaky_relu": lambda a, op: F.leaky_relu(a["x"], f(a, "alpha", 0.01)),
        "sigmoid_hard": lambda a, op: (f(a, "alpha", 0.2) * a["x"] + f(a, "beta", 0.5)).clamp(0.0, 1.0),
        "clip": lambda a, op: a["x"].clamp(f(a, "alpha", 0.0), f(a, "beta", 1.0)),
        "elu": lambda a, op: F.elu(a["x"], f(a, "alpha", 1.0)),
        "thresholded_relu": lambda a, op: torch.where(a["x"] > f(a, "alpha", 1.0), a["x"], 0.0),
        "scaled_tanh": lambda a, op: f(a, "alpha", 1.0) * torch.tanh(f(a, "beta", 1.0) * a["x"]),
        "linear_activation": lambda a, op: f(a, "alpha", 1.0) * a["x"] + f(a, "beta", 0.0),
        "gelu": _gelu, "prelu": _prelu,
        "rsqrt": lambda a, op: torch.rsqrt(a["x"] + f(a, "epsilon", 1e-12)),
        "inverse": lambda a, op: 1.0 / (a["x"] + f(a, "epsilon", 1e-4)),
        "log": lambda a, op: torch.log(a["x"] + f(a, "epsilon", 1e-45)),
        "transpose": lambda a, op: a["x"].permute(_ints(a["perm"])),
        "concat": _concat, "split": _split, "slice_by_index": _slice_by_index, "slice_by_size": _slice_by_size,
        "gather": lambda a, op: torch.from_numpy(np.take(a["x"].numpy(), _t(a["indices"]).numpy(),
                                                         axis=int(a.get("axis", 0)))),
        "tile": lambda a, op: a["x"].repeat(*_ints(a["reps"])),
        "pad": _pad, "upsample_nearest_neighbor": _resize("nearest"), "resize_nearest_neighbor": _resize("nearest"),
        "upsample_bilinear": _resize("bilinear"), "resize_bilinear": _resize("bilinear"),
        "pixel_shuffle": lambda a, op: F.pixel_shuffle(a["x"], int(a["upscale_factor"])),
        "cast": _cast, "identity": lambda a, op: a["x"], "quantize": _quantize, "dequantize": _dequantize,
        "select": lambda a, op: torch.where(_t(a["cond"]).bool(), _t(a["a"]), _t(a["b"])),
    }
    for name in ("reshape", "squeeze", "expand_dims", "flatten2d", "reshape_like"):
        ops[name] = lambda a, op: a["x"].reshape(_declared_shape(op))
    ops.update({name: unary(fn) for name, fn in {
        "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "softplus": F.softplus,
        "softsign": F.softsign, "exp": torch.exp, "exp2": torch.exp2, "sqrt": torch.sqrt, "abs": torch.abs,
        "erf": torch.erf, "square": torch.square, "floor": torch.floor, "ceil": torch.ceil, "round": torch.round,
        "sign": torch.sign, "sin": torch.sin, "cos": torch.cos, "logical_not": torch.logical_not}.items()})
    ops.update({name: binary(fn) for name, fn in {
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div, "maximum": torch.maximum,
        "minimum": torch.minimum, "pow": torch.pow, "floor_div": torch.floor_divide, "mod": torch.remainder,
        "equal": torch.eq, "not_equal": torch.ne, "greater": torch.gt, "greater_equal": torch.ge, "less": torch.lt,
        "less_equal": torch.le, "logical_and": torch.logical_and, "logical_or": torch.logical_or,
        "logical_xor": torch.logical_xor}.items()})
    return ops


_MIL_OPS: dict[str, Callable[[dict, Any], Any]] = {}   # filled on first use: torch is imported lazily
