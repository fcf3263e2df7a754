"""Folding: make the deploy form of a model, numerically exact; a fold that changes outputs is an error.

Re-parameterization (RepVGG, Ding et al. 2021; MobileOne, Vasu et al. 2023; GhostNetV3, Liu et al. 2024), then
Conv+BN / Linear+BN fusion on any model, then the export rewrites (effai.export.rewrites). Per BN:
W' = W * gamma / sqrt(var + eps), b' = beta - mu * gamma / sqrt(var + eps). Detail: docs/architecture.md,
"effai/export/fold.py".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effai.errors import EffaiError
from effai.export.rewrites import apply_rewrites

FOLD_METHODS = ("fold", "reparameterize", "switch_to_deploy")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldReport:
    reparameterized: dict[str, int] = field(default_factory=dict)   # module class -> count
    reparameterized_modules: list[str] = field(default_factory=list)  # their names in the model
    fused_conv_bn: int = 0
    fused_linear_bn: int = 0
    rewritten: dict[str, int] = field(default_factory=dict)         # export rewrites (effai.export.rewrites)
    batchnorms_left: int = 0
    params_before: int = 0
    params_after: int = 0
    modules_before: int = 0
    modules_after: int = 0
    max_abs_err: float | None = None     # folded vs original, on the check inputs
    rel_err: float | None = None         # max_abs_err / max |original output|
    skipped: str | None = None           # reason when folding was not run (--no-fold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, rel_tol: float = 1e-5,
         reference: list[torch.Tensor] | None = None, target: str | None = None) -> FoldReport:
    """Fold `model` in place (eval mode) and return what was done. Idempotent: a second call changes nothing.

    `reference`: the unfolded model's outputs on `example_inputs`, when the caller already has them.
    `target`: apply only the export rewrites that target needs (None: all of them)."""
    model.eval()
    report = FoldReport(params_before=count_params(model), modules_before=len(list(model.modules())))
    if reference is None:
        with torch.no_grad():
            reference = flat_outputs(model(*example_inputs))
    before = reference
    probe = tuple(t[:1] for t in example_inputs)   # structure-finding passes need one sample, not the batch
    reparameterize(model, report)
    fuse_batchnorms(model, probe, report)
    report.rewritten = apply_rewrites(model, probe, target)
    report.params_after = count_params(model)
    report.modules_after = len(list(model.modules()))
    report.batchnorms_left = sum(isinstance(m, _BatchNorm) for m in model.modules())
    with torch.no_grad():
        after = flat_outputs(model(*example_inputs))
    err = max(float((a - b).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.abs().max()) for b in before) or 1.0
    report.max_abs_err, report.rel_err = err, err / max(scale, 1e-12)
    if report.rel_err > rel_tol:
        raise EffaiError(f"folding changed the model's outputs (max abs err {err:.3g}, {report.rel_err:.3g} of the "
                         "output scale); this is a bug in a block's fold - export with --no-fold and report it")
    return report


def reparameterize(model: nn.Module, report: FoldReport) -> None:
    """Call each block's own fold method, children after parents (like timm's reparameterize_model)."""
    counts: Counter[str] = Counter()
    names: list[str] = []

    def fold_self(module: nn.Module, path: str) -> None:
        method = next((m for m in FOLD_METHODS if _no_arg_method(module, m)), None)
        if method is not None:
            shape_before = _shape(module)
            getattr(module, method)()
            if _shape(module) != shape_before:  # count real work only, so a second fold reports nothing
                counts[type(module).__name__] += 1
                names.append(path or "<model>")

    def visit(parent: nn.Module, prefix: str = "") -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            method = next((m for m in FOLD_METHODS if _no_arg_method(child, m)), None)
            if method is not None:
                fold_self(child, path)
            elif _no_arg_method(child, "fuse") and not isinstance(child, nn.ModuleList):
                fused = child.fuse()
                if isinstance(fused, nn.Module):
                    setattr(parent, name, fused)
                    child = fused
                    counts[type(child).__name__] += 1
                    names.append(path)
            visit(child, f"{path}.")

    with torch.no_grad():
        visit(model)
        fold_self(model, "")     # the model's own fold() (after its blocks: idempotent blocks make this a no-op)
    for k, v in counts.items():
        report.reparameterized[k] = report.reparameterized.get(k, 0) + v
    report.reparameterized_modules.extend(names)


def _no_arg_method(module: nn.Module, name: str) -> bool:
    """A deploy method we may call: callable with no arguments (a user's `fold(x)` is something else)."""
    import inspect

    fn = getattr(module, name, None)
    if not callable(fn):
        return False
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _shape(m: nn.Module) -> tuple[int, int]:
    return count_params(m), len(list(m.modules()))


def fuse_batchnorms(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], report: FoldReport) -> None:
    """Fold every BN that directly follows a conv/linear whose output nothing else reads."""
    pairs = find_producer_bn_pairs(model, example_inputs)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for prod_name, bn_name in pairs:
            prod, bn = modules[prod_name], modules[bn_name]
            replacement = _bn_remainder(bn)
            if replacement is None:
                continue
            _fold_bn_into(prod, bn)
            _set_module(model, bn_name, replacement)
            if isinstance(prod, nn.Linear):
                report.fused_linear_bn += 1
            else:
                report.fused_conv_bn += 1


def find_producer_bn_pairs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, str]]:
    produced: dict[int, tuple[str, torch.Tensor, Any, int]] = {}
    calls: Counter[str] = Counter()
    candidates: list[tuple[str, str, torch.Tensor]] = []
    handles = []

    def on_output(name: str):
        def hook(_m, _inp, out):
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out, out.grad_fn, out._version)
        return hook

    def on_bn_input(name: str):
        def hook(_m, inp):
            calls[name] += 1
            x = inp[0] if inp else None
            rec = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
            if rec is not None and rec[1] is x and x.grad_fn is rec[2] and x._version == rec[3]:
                candidates.append((rec[0], name, x))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (*CONVS, nn.Linear)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            handles.append(m.register_forward_hook(on_output(name)))
        elif isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            handles.append(m.register_forward_pre_hook(on_bn_input(name)))
    try:
        with torch.enable_grad():
            outs = flat_outputs(model(*example_inputs))
            consumers = _count_consumers(outs)
    finally:
        for h in handles:
            h.remove()
    return [(p, b) for p, b, x in candidates
            if calls[p] == 1 and calls[b] == 1 and x.grad_fn is not None and consumers[x.grad_fn] == 1]


def _count_consumers(outputs: list[torch.Tensor]) -> Counter:
    """How many autograd nodes read each node's output (the outputs themselves count as readers)."""
    consumers: Counter = Counter()
    seen: set = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    for fn in stack:
        consumers[fn] += 1
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                consumers[nxt] += 1
                stack.append(nxt)
    return consumers


def _fold_bn_into(prod: nn.Module, bn: _BatchNorm) -> None:
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    w = prod.weight
    prod.weight = nn.Parameter(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
    b = prod.bias if prod.bias is not None else torch.zeros_like(bn.running_mean)
    prod.bias = nn.Parameter((b - bn.running_mean) * scale + shift)


def _bn_remainder(bn: _BatchNorm) -> nn.Module | None:
    """What is left of a BN module once its affine transform moved into the conv: Identity, or timm's act/drop."""
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.Identity()
    extra = set(dict(bn.named_children())) - {"drop", "act"}
    if type(bn).__name__.startswith("BatchNormAct") and not extra:
        return nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
    return None  # an unknown BN subclass may do more than normalize: leave it alone


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors (tuples, lists and dicts unpacked)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    raise EffaiError(f"model returned {type(out).__name__}; effai exports models whose outputs are tensors")
