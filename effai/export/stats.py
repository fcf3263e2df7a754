"""Params and MACs of a model's deploy form (what an exported artifact holds), and the per-user cache of them for
the zoo's cards that `effai zoo list` / `zoo show` read.

Counting needs shapes, not values: after the blocks' own folds (which may read their weights), the BN fusion and the
MAC-counting forward run on a meta-device copy, which costs no arithmetic (a 224x224 GhostNetV3 took seconds a card
on real tensors). A model whose forward has no meta kernel, or reads values, is counted on real tensors instead.

The cache (`$XDG_CACHE_HOME/effai/card_stats.json`, else ~/.cache/...) is one JSON object: a header (schema, effai
and timm versions, a hash of the code that defines the counts) and {card fingerprint: {"params", "macs"}}. A header
that differs, or a file that does not parse, is ignored and rewritten (atomically) with fresh counts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from effai.errors import EffaiError
from effai.files import atomic_write, read_json

SCHEMA = "effai.card_stats/1"
CACHE_FILE = "card_stats.json"


def model_stats(model: Any, input_size: tuple[int, int, int], *, inplace: bool = False,
                meta: bool = True) -> dict[str, int]:
    """{"params", "macs"} of the deploy form, batch 1 at input_size (the caller's model is untouched unless
    `inplace`). MACs: card.MAC_CONVENTION (forward hooks over Conv2d and Linear, groups respected). `meta=False`
    counts on real tensors only (the reference the meta count is tested against)."""
    import torch

    from effai.export.fold import FoldReport, reparameterize

    m = (model if inplace else copy.deepcopy(model)).eval()
    reparameterize(m, FoldReport())   # fold()'s first pass, on the model's tensors: some folds read their weights
    if _on_meta(m):
        return _count(m, torch.empty(1, *input_size, device="meta"))
    if meta:
        try:
            return _count(_meta_copy(m), torch.empty(1, *input_size, device="meta"))
        except Exception:   # noqa: BLE001 - an op without a meta kernel or a value-reading forward: count for real
            pass
    return _count(m, torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0)))


def _on_meta(model: Any) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _meta_copy(model: Any) -> Any:
    """A deep copy whose parameters and buffers are meta tensors (no data copied)."""
    import torch

    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _count(m: Any, x: Any) -> dict[str, int]:
    """Conv+BN / Linear+BN fusion (fold()'s second pass, without its output check and export rewrites, which touch
    no Conv/Linear), then one forward that sums each Conv2d's and Linear's multiply-adds."""
    import torch
    from torch import nn

    from effai.export.fold import FoldReport, count_params, fuse_batchnorms

    fuse_batchnorms(m, (x,), FoldReport())
    macs = 0

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            macs += out.numel() * mod.in_features

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    return {"params": count_params(m), "macs": int(macs)}


# ------------------------------------------------------------------------------------------------ the card cache


@functools.lru_cache(maxsize=None)
def card_stats(name: str) -> dict[str, int]:
    """model_stats of a zoo (or timm) card at its own input size (random-init build: weights do not change the
    counts); from the user cache when it holds this card for this code, else measured and added to it."""
    from effai import zoo

    card = zoo.resolve_card(name)
    key = json.dumps([name, card.source, list(card.input_size), card.num_classes,
                      card.extra.get("arch_kwargs", {})], sort_keys=True)
    entries = _entries()
    if key in entries:
        return dict(entries[key])
    stats = _measure(card)
    entries[key] = stats
    try:   # the cache only saves time: a read-only home or a full disk still lists
        atomic_write(cache_path(), json.dumps({**_header(), "cards": entries}, sort_keys=True))
    except OSError:
        pass
    return dict(stats)


def _measure(card: Any) -> dict[str, int]:
    """Built on the meta device (no weight init: timm's ViTs spend seconds there) and counted there; a card whose
    build or folds read values (bundled weights, a fold that merges on the CPU) is built for real."""
    import torch

    from effai import zoo

    size = tuple(card.input_size)
    try:
        with torch.device("meta"):   # the folds' new tensors on meta too
            return model_stats(zoo.build(card), size, inplace=True)
    except Exception:   # noqa: BLE001 - any failure on meta tensors: the real build below is the reference
        pass
    return model_stats(zoo.build(card), size, inplace=True)


def cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "effai" / CACHE_FILE


@functools.lru_cache(maxsize=None)
def _header() -> dict[str, str]:
    """What the counts depend on besides the card: effai's and timm's versions and the code that builds and folds
    (a checkout's edits change the hash, not the version)."""
    from importlib import metadata

    from effai.version import __version__

    try:
        timm_version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        timm_version = "none"
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted([*(here.parent / "zoo").glob("*.py"), here / "fold.py", here / "stats.py"]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return {"schema": SCHEMA, "effai": __version__, "timm": timm_version, "code": h.hexdigest()[:16]}


_ENTRIES: dict[str, dict[str, int]] | None = None   # read once per process: `zoo list` asks for every card


def _entries() -> dict[str, dict[str, int]]:
    global _ENTRIES
    if _ENTRIES is None:
        _ENTRIES = read_cache()
    return _ENTRIES


def read_cache(path: Path | None = None) -> dict[str, dict[str, int]]:
    """The cached {card fingerprint: stats} for this code; {} for a missing, corrupt, foreign or stale file."""
    path = path or cache_path()
    try:
        data = read_json(path, "the card stats cache")   # bounded: size and nesting
    except EffaiError:
        return {}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in _header().items()):
        return {}
    cards = data.get("cards")
    if not isinstance(cards, dict):
        return {}
    return {k: {"params": v["params"], "macs": v["macs"]} for k, v in cards.items()
            if isinstance(v, dict) and all(type(v.get(f)) is int and v[f] >= 0 for f in ("params", "macs"))}


def clear_memo() -> None:
    """Forget what this process read or measured (tests that point XDG_CACHE_HOME elsewhere)."""
    global _ENTRIES
    _ENTRIES = None
    card_stats.cache_clear()
