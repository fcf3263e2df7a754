"""ADEM-VL training, top to bottom: (1) the tiny LM (a transformers LlamaForCausalLM) and its tokenizer trained on the
templated text of the training split, unless --set lm=DIR gives one; (2) the vision-language stage: trunk features
cached once (the encoder is frozen), then projector + fusion trained with the LM frozen, loss on answer tokens only.
Checkpoints: atomic, weights-only (checkpoint.pt), resumable. Spec: docs/ademvl.md.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from effai.data import vqa
from effai.errors import UsageError
from effai.files import atomic_write, replace_dir, staging_dir
from effai.train import checkpoint as ckpt
from effai.train.ademvl.config import AdemvlConfig
from effai.train.optim import warmup_cosine
from effai.zoo import ademvl as zm

CHECKPOINT = "checkpoint.pt"


def train_ademvl(cfg: AdemvlConfig, *, force: bool = False, progress: Any = None) -> dict[str, Any]:
    out = Path(cfg.out)
    _check_out(out, cfg, force)
    user_lm = zm.resolve_lm_dir(cfg.lm) if cfg.lm is not None else None     # bad LM folders fail before any write
    torch.manual_seed(cfg.seed)
    trunk, channels, size, mean, std = zm.build_trunk(cfg.encoder, cfg.feature_layer)
    full = vqa.load(cfg.data, size[1], size[0], image_root=cfg.image_root, photos=cfg.photos, seed=cfg.seed)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_set, val_set = vqa.split(full, cfg.val_fraction, split_seed)
    if len(train_set) == 0 or len(val_set) == 0:
        raise UsageError(f"--data {cfg.data}: {len(train_set)} training and {len(val_set)} held-out questions; "
                         "give at least a few images per answer")
    ckpt.prepare_run_dir(out, force, (CHECKPOINT, "metrics.jsonl", "model.safetensors", "train_record.json"), ("lm",))
    log = _Log(progress)

    # --- stage 1: the LM ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if cfg.lm is None:
        lm_dir, lm_spec = out / "lm", "lm"
        if not (cfg.resume and (lm_dir / "config.json").is_file()):
            train_tiny_lm(train_set.texts(), lm_dir, cfg, log)
    else:
        lm_dir = user_lm
        lm_spec = str(lm_dir.resolve())
    lm_minutes = (time.perf_counter() - t0) / 60
    tok = vqa.load_tokenizer(lm_dir)
    lm = zm.load_causal_lm(lm_dir)

    # --- stage 2: vision-language ------------------------------------------------------------------------------------
    arch = {**zm.ARCH_DEFAULTS, "lm": lm_spec, "encoder": cfg.encoder, "feature_layer": cfg.feature_layer,
            "scales": list(cfg.scales), "mode": cfg.mode, "drop_ratio": cfg.drop_ratio, "beta": cfg.beta,
            "scale": cfg.scale, "proj_hidden": cfg.proj_hidden}
    torch.manual_seed(cfg.seed)
    model = zm.AdemVL(trunk, lm, tok, feature_dim=channels, scales=cfg.scales, mode=cfg.mode,
                      drop_ratio=cfg.drop_ratio, beta=cfg.beta, scale=cfg.scale, proj_hidden=cfg.proj_hidden,
                      input_size=size, arch=arch)
    counts = zm.trainable_parameters(model)
    fm_train = trunk_features(model, train_set.images, mean, std)
    fm_val = trunk_features(model, val_set.images, mean, std)
    batches = Batches(train_set, tok, cfg.batch_size, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    start, history = 0, []
    last = out / CHECKPOINT
    if cfg.resume and last.is_file():
        state = ckpt.load(last)
        ckpt.check_same_run(state.get("config", {}), cfg.to_dict(), last)
        model.load_state_dict({**model.state_dict(), **state["trainable"]})
        opt.load_state_dict(state["opt"])
        start, history = int(state["step"]), list(state["history"])
        batches.g.set_state(state["batch_rng"])
        ckpt.set_rng_state(state["rng"])
    ckpt.truncate_metrics(out / "metrics.jsonl", "step", start if start else None)
    step_times: list[float] = []
    model.train()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(cfg.lr, step, cfg.steps, warmup)
        img, ids, labels, mask = batches.next()
        t = time.perf_counter()
        loss = vl_loss(model, fm_train[img], ids, labels, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t)
        log.step(step + 1, cfg.steps, loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = evaluate(model, fm_val, val_set)
            row = {"step": step + 1, "loss": loss.item(), "val_acc": acc["all"], "val_acc_by_kind": acc["by_kind"],
                   "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            trainable = {k: v for k, v in model.state_dict().items() if k.startswith("projector.")
                         or "ademvl_fusion." in k}
            ckpt.save_atomic({"trainable": trainable, "opt": opt.state_dict(), "step": step + 1, "history": history,
                              "rng": ckpt.rng_state(), "batch_rng": batches.g.get_state(),
                              "config": cfg.to_dict()}, last)
            log.evaluated(row)
    model.eval()
    acc = evaluate(model, fm_val, val_set)
    step_ms = 1000 * statistics.median(step_times) if step_times else None
    record = {"recipe": "ademvl", "config": {**cfg.to_dict(), "split_seed": split_seed}, "val_acc": acc["all"],
              "val_acc_by_kind": acc["by_kind"], "params": counts, "train_step_ms_median": step_ms,
              "num_visual": model.num_visual, "lm_minutes": lm_minutes,
              "dataset": {"source": full.source, "train_questions": len(train_set), "val_questions": len(val_set)},
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model_path = zm.save(model, out / "model.safetensors", record)
    atomic_write(out / "train_record.json", json.dumps({**record, "history": history}, indent=2) + "\n")
    return {"model_path": str(model_path), "val_acc": acc["all"], "val_acc_by_kind": acc["by_kind"],
            "trainable_params": counts["trainable"], "projector_params": counts["projector"],
            "fusion_params": counts["fusion"], "train_step_ms": step_ms, "num_visual": model.num_visual,
            "out": str(out), "history": history}


# --- stage 1 ----------------------------------------------------------------------------------------------------------

def train_tiny_lm(texts: list[str], lm_dir: Path, cfg: AdemvlConfig, log: Any = None) -> Path:
    """Tokenizer + LlamaForCausalLM (lm_hidden x lm_layers) trained by next-token prediction on `texts`; written to
    lm_dir with save_pretrained (safetensors) through a staging folder, so a killed run leaves no half LM."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tmp = staging_dir(lm_dir)
    try:
        tok = vqa.train_tokenizer(texts, tmp)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.lm_hidden, intermediate_size=2 * cfg.lm_hidden,
                             num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                             num_key_value_heads=cfg.lm_heads, max_position_embeddings=2048,
                             tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        torch.manual_seed(cfg.seed)
        lm = LlamaForCausalLM(config)
        enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        g = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lm_lr, weight_decay=0.01)
        lm.train()
        for step in range(cfg.lm_steps):
            for grp in opt.param_groups:
                grp["lr"] = warmup_cosine(cfg.lm_lr, step, cfg.lm_steps, max(1, cfg.lm_steps // 20))
            idx = torch.randint(0, len(enc), (cfg.batch_size,), generator=g).tolist()
            ids, mask = _pad([enc[i] for i in idx], tok.pad_token_id)
            labels = ids.masked_fill(mask == 0, -100)
            loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None:
                log.step(step + 1, cfg.lm_steps, loss.item(), stage="lm")
        lm.eval()
        lm.save_pretrained(str(tmp), safe_serialization=True)
        replace_dir(tmp, lm_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lm_dir


# --- stage 2 ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def trunk_features(model: zm.AdemVL, images: torch.Tensor, mean: tuple, std: tuple, batch: int = 256) -> torch.Tensor:
    """The frozen trunk's feature maps of uint8 images, computed once (training then touches only the projector)."""
    from effai.data.datasets import normalized

    outs = [model.trunk(normalized(images[i:i + batch], mean, std))[-1] for i in range(0, len(images), batch)]
    return torch.cat(outs)


def encode_qa(tok: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of '<bos> question: q answer: a <eos>' and labels (-100 on the prompt: the loss is on the answer)."""
    p = tok(vqa.prompt(question))["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, [-100] * len(p) + a


def _pad(rows: list[list[int]], pad: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad if fill is None else fill, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


class Batches:
    """Seeded random batches of (image index, ids, labels, attention mask), right-padded."""

    def __init__(self, data: vqa.VQASet, tok: Any, batch_size: int, seed: int) -> None:
        self.enc = [encode_qa(tok, q, a) for _, q, a, _ in data.items]
        self.img = torch.tensor([i for i, _, _, _ in data.items])
        self.pad, self.bs = tok.pad_token_id, batch_size
        self.g = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.enc), (self.bs,), generator=self.g).tolist()
        ids, mask = _pad([self.enc[i][0] for i in idx], self.pad)
        labels, _ = _pad([self.enc[i][1] for i in idx], self.pad, fill=-100)
        return self.img[idx], ids, labels, mask


def vl_loss(model: zm.AdemVL, fmaps: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens, the visual features projected from cached trunk maps."""
    logits = model.text_logits(model.project(fmaps), ids, mask)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(model: zm.AdemVL, fmaps: torch.Tensor, data: vqa.VQASet, batch: int = 256) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers (KV cache), overall and per question kind."""
    was = model.training
    model.eval()
    by_q: dict[str, list[tuple[int, str, str]]] = {}
    for i, q, a, k in data.items:
        by_q.setdefault(q, []).append((i, a, k))
    hits: dict[str, list[int]] = {}
    for q, rows in by_q.items():
        ids = torch.tensor([model.tokenizer(vqa.prompt(q))["input_ids"]])
        for s in range(0, len(rows), batch):
            part = rows[s:s + batch]
            visual = model.project(fmaps[[i for i, _, _ in part]])
            outs = zm.greedy(model, visual, ids.expand(len(part), -1), max_new_tokens=4)
            for (_, a, k), o in zip(part, outs):
                hits.setdefault(k, []).append(int(model.tokenizer.decode(o, skip_special_tokens=True).strip() == a))
    model.train(was)
    n = sum(len(v) for v in hits.values())
    return {"all": sum(sum(v) for v in hits.values()) / max(1, n),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())}}


class _Log:
    def __init__(self, progress: Any) -> None:
        self.console = getattr(progress, "console", None)
        self.last = 0.0

    def step(self, i: int, total: int, loss: float, stage: str = "vl") -> None:
        now = time.perf_counter()
        if self.console is not None and (now - self.last > 5 or i == total):
            self.last = now
            self.console.print(f"  {stage} step {i}/{total}  loss {loss:.3f}")

    def evaluated(self, row: dict[str, Any]) -> None:
        if self.console is not None:
            kinds = " ".join(f"{k} {v:.0%}" for k, v in row["val_acc_by_kind"].items())
            self.console.print(f"[green]✓[/] step {row['step']}  held-out {row['val_acc']:.1%}  ({kinds})")


def _check_out(out: Path, cfg: AdemvlConfig, force: bool) -> None:
    ckpt.refuse_existing_run(out, finished=out / "model.safetensors", started=(out / CHECKPOINT, out / "lm"),
                             resume=cfg.resume, force=force, finished_as="a finished ADEM-VL run")


