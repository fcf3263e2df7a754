"""The zoo: one front door, `create`, from a zoo name, any timm model name, or a user's module file.

    loaded = zoo.create("ghostnetv3_100", weights="ckpt.safetensors")
    loaded.model, loaded.card, loaded.weights
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from effai.errors import EffaiError, UsageError
from effai.zoo.card import ModelCard
from effai.zoo.build import build, resolve_card
from effai.zoo import ademvl, cdfkd_student, devit_fusion, srdiff, vq  # noqa: F401  (they register their architectures)
from effai.zoo.catalog import CARDS
from effai.zoo.labels import label_set
from effai.zoo.user_module import load_model_def
from effai.files import loads_json, sha256 as sha256_file
from effai.zoo.weights import RANDOM_INIT, WeightsInfo, load_into, read_state_dict

__all__ = ["CARDS", "LoadedModel", "ModelCard", "build", "create", "resolve_card", "labels"]


@dataclass
class LoadedModel:
    model: nn.Module
    card: ModelCard
    weights: WeightsInfo
    notes: list[str] = field(default_factory=list)   # things the user must hear (random init, defaults taken)

    @property
    def random_init(self) -> bool:
        return self.weights.sha256 == "random-init"


def labels(card: ModelCard) -> list[str]:
    if "labels" in card.extra:
        return list(card.extra["labels"])
    return list(label_set(card.label_set, card.num_classes))


def create(name: str | None = None, *, weights: str | Path | None = None, pretrained: bool = False,
           model_def: str | None = None) -> LoadedModel:
    """Build a model in eval mode with its card and a record of where its weights came from."""
    if name is None and model_def is None and weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"{weights}: no such file; pass a checkpoint (a finished effai train run writes "
                             "<run>/model.safetensors)")
        card = card_from_checkpoint(Path(weights))
        if card is None:
            raise UsageError(f"{weights} carries no effai model card; name the model it was trained as "
                             "(effai export MODEL --weights PATH)")
        check_card_fits(card, Path(weights))
        loaded = LoadedModel(build(card), card, RANDOM_INIT)
        _load_weights(loaded, Path(weights))
        loaded.model.eval()
        return loaded
    if (name is None) == (model_def is None):
        raise UsageError("give exactly one of a model name or --model-def path/file.py:ClassOrFactory")
    if pretrained and weights is not None:
        raise UsageError("--pretrained and --weights both choose weights; pass one of them")
    if model_def is not None:
        model, card = load_model_def(model_def)
        loaded = LoadedModel(model, card, RANDOM_INIT)
    else:
        card = resolve_card(name)  # type: ignore[arg-type]
        if pretrained:
            loaded = _timm_pretrained(card)
        else:
            if card.bundled_weights and weights is None:
                weights = Path(__file__).parent / "weights" / card.bundled_weights
            saved = card_from_checkpoint(Path(weights)) if weights is not None else None
            if saved is not None and saved.source == card.source:
                card = card.with_(input_size=saved.input_size, mean=saved.mean, std=saved.std,
                                  num_classes=saved.num_classes, label_set=None, extra={**card.extra, **saved.extra})
                check_card_fits(card, Path(weights))
            loaded = LoadedModel(build(card), card, RANDOM_INIT)
    if weights is not None:
        _load_weights(loaded, Path(weights))
    if loaded.random_init:
        loaded.notes.append(f"WEIGHTS ARE RANDOM-INIT for {loaded.card.name}: outputs are meaningless for real "
                            "images; pass --weights PATH or --pretrained")
    loaded.model.eval()
    return loaded


# Architecture options a checkpoint's metadata may set (metadata is untrusted: only these names, JSON values).
SAFE_ARCH_KWARGS = ("deploy", "num_branches", "scale_branch", "identity_bn", "drop_rate", "patch_size",
                    # CDFKD-MFS multi-header student (effai/train/cdfkd)
                    "backbone", "backbone_kwargs", "exits", "exit_channels", "header_dims", "aggregation",
                    # DeViT parts and fusion head (effai/train/devit)
                    "parts", "d_sub", "d_teacher", "split_hash", "part_classes",
                    # structurally pruned ViTs (DeViT's optional stage): heads and MLP neurons per block
                    "block_heads", "block_mlp",
                    # SRDiff / SAM-DiffSR (effai/zoo/srdiff.py SRDiffSpec; lr_size is the card's input size)
                    "scale", "enc_channels", "enc_blocks", "growth", "unet_channels", "timesteps", "schedule")


MAX_WIDTH = 65536        # no width, class count or input side in a plausible checkpoint is larger


def _plausible(key: str, v: object, depth: int = 0) -> None:
    """Checkpoint metadata is untrusted: bounded JSON values only, so a crafted card cannot ask for a model that
    exhausts memory before its weights are even read."""
    ok = (v is None or isinstance(v, bool)
          or (isinstance(v, int) and 0 <= v <= MAX_WIDTH)
          or (isinstance(v, float) and 0.0 <= v <= MAX_WIDTH)
          or (isinstance(v, str) and len(v) <= 200))
    if isinstance(v, list) and len(v) <= 64 and depth < 3:
        for x in v:
            _plausible(key, x, depth + 1)
        return
    if isinstance(v, dict) and len(v) <= 16 and depth < 3:
        for k, x in v.items():
            _plausible(f"{key}.{k}", x, depth + 1)
        return
    if not ok:
        raise UsageError(f"checkpoint card option {key}={str(v)[:60]} is out of range (ints 0..{MAX_WIDTH}, short "
                         "strings, small lists); the file is damaged or not from effai: re-save it")


MAX_INPUT_ELEMENTS = 3 * 4096 * 4096   # C*H*W of one input: a 4096 x 4096 RGB image (the fusion head's C x 1 x 1 fits)


def card_from_checkpoint(path: Path) -> ModelCard | None:
    """The model card effai train wrote into a safetensors file's metadata, if any. The metadata is untrusted:
    every value is type- and range-checked here, and `check_card_fits` compares the architecture it describes with
    the file's tensors before anything is built."""
    meta = _safetensors_metadata(path) if path.is_file() else {}
    if "effai.card" not in meta:
        return None
    try:
        c = loads_json(meta["effai.card"], f"the effai.card metadata of {path}")
        if not isinstance(c, dict):
            raise TypeError("effai.card is not a JSON object")
        labels = loads_json(meta["labels"], f"the labels metadata of {path}") if "labels" in meta else None
        if labels is not None and (not isinstance(labels, list) or len(labels) > MAX_WIDTH
                                   or not all(isinstance(x, str) and len(x) <= 200 for x in labels)):
            raise TypeError("labels is not a list of class names")
        arch = c.get("arch_kwargs", {})
        if not isinstance(arch, dict):
            raise TypeError("arch_kwargs is not a JSON object")
        arch = {k: v for k, v in arch.items() if k in SAFE_ARCH_KWARGS}   # metadata is untrusted
        for k, v in {**arch, "input_size": list(c["input_size"]), "num_classes": c["num_classes"]}.items():
            _plausible(k, v)
        size = _input_size(c["input_size"], path)
        mean, std = _stats(c["mean"], "mean"), _stats(c["std"], "std")
        num_classes = c["num_classes"]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise TypeError(f"num_classes {str(num_classes)[:40]} is not an integer >= 0 (0: a feature extractor, "
                            "as a DeViT part)")
        for k in ("name", "source", "family", "interpolation"):
            if not isinstance(c.get(k, ""), str) or len(c.get(k, "")) > 200:
                raise TypeError(f"{k} is not a short string")
        extra: dict = {"arch_kwargs": arch, **({"labels": labels} if labels else {})}
        if "effai.train" in meta:  # evaluate on the training run's own held-out split
            record = loads_json(meta["effai.train"], f"the effai.train metadata of {path}")
            tcfg = record.get("config", {}) if isinstance(record, dict) else {}
            tcfg = tcfg if isinstance(tcfg, dict) else {}
            if isinstance(tcfg.get("data"), str) and tcfg["data"]:
                seed = tcfg.get("split_seed")
                extra["split"] = {"data": tcfg["data"], "seed": tcfg.get("seed", 0) if seed is None else seed,
                                  "val_fraction": tcfg.get("val_fraction", 0.2)}
                if tcfg["data"] == "digits":   # a bundled set; a path named by metadata is not followed
                    extra["eval_data"] = tcfg["data"]
            extra["train_record"] = record
        return ModelCard.from_dict({**c, "input_size": size, "mean": mean, "std": std, "num_classes": num_classes},
                                   description=f"trained by effai ({path.name})", extra=extra)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"{path} has a malformed effai.card in its metadata ({e}); re-save it") from None


def _input_size(v: object, path: Path) -> tuple[int, int, int]:
    ok = (isinstance(v, list) and len(v) == 3 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                      for d in v))
    if not ok:
        raise TypeError(f"input_size {str(v)[:60]} is not [C, H, W] of positive integers")
    c, h, w = v  # type: ignore[misc]
    if c * h * w > MAX_INPUT_ELEMENTS:
        raise UsageError(f"{path}: its card declares inputs of {c}x{h}x{w} = {c * h * w:,} values, over effai's limit "
                         f"of {MAX_INPUT_ELEMENTS:,} (a 4096x4096 RGB image); the file is damaged or not from effai")
    return (c, h, w)


def _stats(v: object, what: str) -> tuple[float, ...]:
    import math

    if not isinstance(v, list) or not 1 <= len(v) <= 4096 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise TypeError(f"{what} is not a short list of numbers")
    if what == "std" and any(x <= 0 for x in v):
        raise TypeError("std has values <= 0")
    return tuple(float(x) for x in v)


def check_card_fits(card: ModelCard, path: Path) -> None:
    """Before any memory is allocated for a card read from an untrusted file: build its architecture on the meta
    device (shapes only) and require the same number of values as the tensors the file's header declares, so a
    crafted card cannot make effai allocate more than the file holds."""
    import math

    import torch

    declared = _safetensors_shapes(path)
    if declared is None:
        return
    try:
        with torch.device("meta"):
            model = build(card)
    except EffaiError:
        raise
    except Exception as e:  # noqa: BLE001 - untrusted options the architecture rejects
        raise UsageError(f"{path}: its card ({card.source}) cannot be built: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}; the file is damaged or not from effai: "
                         "re-save it") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_model = sum(math.prod(s) for s in own.values())
    n_file = sum(math.prod(s) for s in declared.values())
    if n_model != n_file:
        differ = [f"{k} {declared[k]} vs {own[k]}" for k in own if k in declared and declared[k] != own[k]][:3]
        raise UsageError(f"{path}: its card describes {card.source} with {n_model:,} values but the file holds "
                         f"{n_file:,}{' (' + '; '.join(differ) + ')' if differ else ''}; the card does not match the "
                         "weights: the file is damaged or not from effai, re-save it")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} from a safetensors header (no tensor is read); None for other files."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged headers
        raise UsageError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                         f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None


def _load_weights(loaded: LoadedModel, path: Path) -> None:
    sd = read_state_dict(path)
    meta = _safetensors_metadata(path)
    card = loaded.card
    if card.source.startswith("effai:ghostnetv3"):  # timm / reference-code GhostNetV3 checkpoints
        from effai.zoo.ghostnetv3 import remap_timm_state_dict

        sd = remap_timm_state_dict(sd)
        if "conv_stem.weight" in sd and not any(".primary_rpr_conv." in k or ".cheap_rpr_conv." in k for k in sd) \
                and not card.extra.get("arch_kwargs", {}).get("deploy"):   # a checkpoint already in deploy form
            card = card.with_(extra={**card.extra, "arch_kwargs": {**card.extra.get("arch_kwargs", {}), "deploy": True}})
            loaded.model = build(card)
            loaded.notes.append("checkpoint is in deploy (folded) form; built the deploy form to match")
    classifier = _classifier_key(loaded.model) or ("classifier" if card.source.startswith("effai:") else None)
    if classifier and f"{classifier}.weight" in sd and card.source.startswith(("timm:", "effai:")):
        n = int(sd[f"{classifier}.weight"].shape[0])
        if n != card.num_classes:  # fine-tuned head: rebuild the model for the checkpoint's class count
            card = card.with_(num_classes=n, label_set=None)
            loaded.model = build(card)
            loaded.notes.append(f"checkpoint has {n} classes; built {card.name} with a {n}-way head")
    if "labels" in meta:
        card = card.with_(extra={**card.extra, "labels": loads_json(meta["labels"], f"the labels metadata of {path}")})
    load_into(loaded.model, sd, card.name, path)
    loaded.card = card
    loaded.weights = WeightsInfo(source=str(path), sha256=sha256_file(path), bytes=path.stat().st_size)


def _classifier_key(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    key = cfg.get("classifier") if isinstance(cfg, dict) else None
    return key if isinstance(key, str) else None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable: read_state_dict reports it clearly
        return {}


def _timm_pretrained(card: ModelCard) -> LoadedModel:
    """timm's hub weights. Without network, use the local HF cache at once instead of retrying for a minute."""
    import timm
    from huggingface_hub import constants

    kind, _, ref = card.source.partition(":")
    ref = card.extra.get("timm_name", ref)
    saved = constants.HF_HUB_OFFLINE
    if not saved and not _hub_reachable(constants.ENDPOINT):
        constants.HF_HUB_OFFLINE = True   # cache only: fails fast when the weights were never downloaded
    try:
        model = timm.create_model(ref, pretrained=True)
        if kind == "effai":  # effai's own architecture with timm's weights (same parameter names)
            from effai.zoo.ghostnetv3 import remap_timm_state_dict

            effai_model = build(card)
            effai_model.load_state_dict(remap_timm_state_dict(model.state_dict()), strict=True)
            model = effai_model
    except Exception as e:  # network, hub, or missing-weights errors all end the same way for the user
        text = " ".join(str(e).split()) or type(e).__name__
        first = text.split(". ")[0][:200]
        offline = " (no network, and not in the local Hugging Face cache)" if constants.HF_HUB_OFFLINE else ""
        raise EffaiError(f"could not fetch pretrained weights for {card.name}{offline}: {first}; download them where "
                         "there is network (or copy the HF cache) and pass --weights PATH") from e
    finally:
        constants.HF_HUB_OFFLINE = saved
    return LoadedModel(model, card, WeightsInfo(source=f"timm-hub:{ref}", sha256=_hub_sha(model)))


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub (or the configured proxy) within `timeout` seconds?"""
    import socket
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_sha(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
