"""DeLVM training, top to bottom: (1) the VQ tokenizer (effai.zoo.vq) on the training images and their task outputs;
(2) the pairs of every task tokenized once; (3) optionally a larger teacher LM; (4) the LM (a transformers
LlamaForCausalLM built from a LlamaConfig here) by next-token prediction over visual sentences, plus logit KD over
the visual tokens when `kd` is on:

    L = CE(z_s, y) + w * LOSSES[kd_loss](z_s[visual], z_t[visual])     (kd: T^2 KL(p_t^T || p_s^T), Hinton 2015)

(5) held-out evaluation per task: the target image's token loss (teacher-forced) and the pixel PSNR of its greedy
generation (one example pair + the query input in context), decoded by the VQ decoder.
The run dir holds vq.safetensors, lm/ (save_pretrained + tokenizer: effai.generate exports it), train_record.json.
Resumable by stage (--set resume=true keeps a finished tokenizer / teacher). Spec: docs/delvm.md.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from effai.data import visual_sentences as vs
from effai.errors import UsageError
from effai.files import atomic_write, replace_dir, staging_dir
from effai.train import checkpoint as ckpt
from effai.train.delvm.config import DelvmConfig
from effai.train.optim import warmup_cosine
from effai.zoo import vq as zvq


def train_delvm(cfg: DelvmConfig, *, force: bool = False, progress: Any = None) -> dict[str, Any]:
    out = Path(cfg.out)
    _check_out(out, cfg, force)
    log = _Log(progress)
    t_start = time.perf_counter()
    train_images = vs.source_images("train", cfg.images, cfg.size, cfg.seed)
    eval_images = vs.source_images("eval", cfg.eval_images + 1, cfg.size, cfg.seed)
    ckpt.writable_run_dir(out)
    if force:
        for name in ("vq.safetensors", "train_record.json"):
            (out / name).unlink(missing_ok=True)
        for d in ("lm", "teacher"):
            shutil.rmtree(out / d, ignore_errors=True)

    # (1) tokenizer
    vq_path = out / "vq.safetensors"
    if cfg.vq is not None:
        vq = zvq.load(Path(cfg.vq))
    elif cfg.resume and vq_path.is_file():
        vq = zvq.load(vq_path)
    else:
        vq = train_vq(train_images, cfg, log)
        zvq.save(vq, vq_path, {"steps": cfg.vq_steps, "seed": cfg.seed})
    if vq.config.size != cfg.size:
        raise UsageError(f"the tokenizer takes {vq.config.size}px images, the run {cfg.size}px; pass --set "
                         f"size={vq.config.size}")
    encode = encoder_fn(vq)
    # (2) pairs
    bank = vs.build_bank(train_images, encode, cfg.tail_count, cfg.seed, augment=cfg.tail_mode == "augment")
    eval_bank = vs.build_bank(eval_images, encode, len(eval_images), cfg.seed + 1, augment=False)
    vocab = vs.N_SPECIAL + vq.config.codebook
    # (3) teacher
    teacher = None
    if cfg.kd:
        if cfg.teacher is not None:
            teacher = load_lm(Path(cfg.teacher), vocab)
        elif cfg.resume and (out / "teacher" / "config.json").is_file():
            teacher = load_lm(out / "teacher", vocab)
        else:
            teacher = new_lm(vocab, cfg.teacher_hidden, cfg.teacher_layers, cfg.lm_heads, cfg.seed + 100)
            train_lm(teacher, vs.SentenceSampler(bank, cfg.tail_mode, cfg.tail_share, cfg.seed + 100),
                     cfg.teacher_steps, cfg.batch_size, cfg.lr, log, stage="teacher")
            save_lm(teacher, out / "teacher")
        teacher.eval()
    # (4) the LM
    lm = new_lm(vocab, cfg.lm_hidden, cfg.lm_layers, cfg.lm_heads, cfg.seed)
    t0 = time.perf_counter()
    losses = train_lm(lm, vs.SentenceSampler(bank, cfg.tail_mode, cfg.tail_share, cfg.seed), cfg.steps,
                      cfg.batch_size, cfg.lr, log, teacher=teacher, kd_loss=cfg.kd_loss, kd_weight=cfg.kd_weight,
                      kd_temperature=cfg.kd_temperature)
    lm_minutes = (time.perf_counter() - t0) / 60
    save_lm(lm, out / "lm")
    # (5) evaluation
    result = evaluate(lm, vq, eval_bank)
    if teacher is not None:
        result_teacher = evaluate(teacher, vq, eval_bank)
    record = {"recipe": "delvm", "config": cfg.to_dict(), "tail_share": cfg.tail_share, "eval": result,
              "teacher_eval": result_teacher if teacher is not None else None,
              "final_train_loss": float(np.mean(losses[-20:])), "lm_minutes": lm_minutes,
              "lm_params": sum(p.numel() for p in lm.parameters()),
              "vq_params": sum(p.numel() for p in vq.parameters()),
              "minutes": (time.perf_counter() - t_start) / 60,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(out / "train_record.json", json.dumps(record, indent=2) + "\n")
    return {"model_path": str(out / "lm"), "vq_path": str(vq_path if cfg.vq is None else cfg.vq), "out": str(out),
            "val_acc": None, "eval": result, "lm_params": record["lm_params"], "vq_params": record["vq_params"],
            "mean_psnr": float(np.mean([r["psnr"] for r in result.values()])),
            "tail_psnr": float(np.mean([result[t]["psnr"] for t in vs.TAIL_TASKS]))}


# --- (1) tokenizer -----------------------------------------------------------------------------------------------------

def train_vq(images: np.ndarray, cfg: DelvmConfig, log: Any = None) -> zvq.VQVAE:
    """The VQ-VAE on the images and every task's outputs (so edge maps and binary masks tokenize well too)."""
    torch.manual_seed(cfg.seed)
    sub = images[: max(cfg.tail_count * 8, 64)]
    outs = [images, vs.apply_task("invert", images)[1], vs.apply_task("edges", images)[1],
            vs.apply_task("denoise", images, cfg.seed)[0], vs.apply_task("threshold", sub)[1]]
    data = torch.from_numpy(np.concatenate(outs))[:, None]
    vq = zvq.VQVAE(zvq.VQConfig(channels=1, size=cfg.size, hidden=cfg.vq_hidden, dim=cfg.code_dim,
                                codebook=cfg.codebook))
    opt = torch.optim.Adam([p for p in vq.parameters()], lr=cfg.vq_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    vq.train()
    for step in range(cfg.vq_steps):
        for grp in opt.param_groups:
            grp["lr"] = warmup_cosine(cfg.vq_lr, step, cfg.vq_steps, max(1, cfg.vq_steps // 20))
        x = zvq.to_pixels(data[torch.randint(0, len(data), (32,), generator=g)])
        x = torch.flip(x, dims=(-1,)) if step % 2 else x
        _, loss, _ = vq(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None:
            log.step(step + 1, cfg.vq_steps, loss.item(), stage="vq")
    return vq.eval()


def encoder_fn(vq: zvq.VQVAE) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W) float [0, 1] -> (N, T) int64 codes."""
    def encode(x: np.ndarray) -> np.ndarray:
        t = zvq.to_pixels(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None])
        return torch.cat([vq.encode(t[i:i + 256]) for i in range(0, len(t), 256)]).numpy()
    return encode


# --- (3, 4) the LM ------------------------------------------------------------------------------------------------------

def new_lm(vocab: int, hidden: int, layers: int, heads: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=vs.BOS, eos_token_id=vs.EOS, pad_token_id=vs.EOS)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tokenizer(codebook: int) -> Any:
    """A word-level fast tokenizer over '<unk> <s> </s> <sep> v0 .. v{K-1}' (visual token of code k: 'v{k}')."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(vs.SPECIALS) + [f"v{k}" for k in range(codebook)])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   sep_token="<sep>", pad_token="</s>")


def save_lm(lm: Any, lm_dir: Path) -> Path:
    """save_pretrained (safetensors) + the tokenizer, through a staging dir (a killed run leaves no half LM)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = staging_dir(lm_dir)
    try:
        lm.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer(lm.config.vocab_size - vs.N_SPECIAL).save_pretrained(str(tmp))
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        replace_dir(tmp, Path(lm_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(lm_dir)


def load_lm(lm_dir: Path, vocab: int | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    if not (Path(lm_dir) / "config.json").is_file():
        raise UsageError(f"{lm_dir} has no config.json; pass an LM dir written by effai train delvm")
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True, dtype="float32").eval()
    if vocab is not None and lm.config.vocab_size != vocab:
        raise UsageError(f"{lm_dir}: LM vocabulary {lm.config.vocab_size} != {vs.N_SPECIAL} specials + codebook "
                         f"{vocab - vs.N_SPECIAL}; pair the LM with the tokenizer it was trained on")
    return lm


def train_lm(lm: Any, sampler: vs.SentenceSampler, steps: int, batch_size: int, lr: float, log: Any = None,
             stage: str = "lm", teacher: Any = None, kd_loss: str = "kd", kd_weight: float = 1.0,
             kd_temperature: float = 1.0) -> list[float]:
    """Next-token CE over whole visual sentences (+ logit KD over the visual-token positions and vocabulary)."""
    from effai.train.losses import LOSSES, KDParams

    kd_fn, params = (LOSSES.get(kd_loss), KDParams(temperature=kd_temperature)) if teacher is not None else (None, None)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    lm.train()
    losses = []
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = warmup_cosine(lr, step, steps, max(1, steps // 20))
        ids = torch.from_numpy(sampler.batch(batch_size))
        logits = lm(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        if kd_fn is not None:
            with torch.no_grad():
                z_t = teacher(input_ids=ids).logits[:, :-1]
            vis = target >= vs.N_SPECIAL
            loss = loss + kd_weight * kd_fn(logits[vis][:, vs.N_SPECIAL:], z_t[vis][:, vs.N_SPECIAL:],
                                            target[vis] - vs.N_SPECIAL, params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log.step(step + 1, steps, loss.item(), stage=stage)
    lm.eval()
    return losses


# --- (5) evaluation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_image(lm: Any, prompts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Greedy decoding of n_tokens visual tokens (argmax over the visual vocabulary) with the KV cache:
    (B, L) prompt ids -> (B, n_tokens) codes."""
    out = lm(input_ids=prompts, use_cache=True)
    past, codes = out.past_key_values, []
    for i in range(n_tokens):
        nxt = out.logits[:, -1, vs.N_SPECIAL:].argmax(-1)
        codes.append(nxt)
        if i + 1 < n_tokens:
            out = lm(input_ids=(nxt + vs.N_SPECIAL)[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
    return torch.stack(codes, 1)


def eval_sentences(bank: vs.PairBank, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out sentences of `task`: example pair i, query pair i+1 (N-1 sentences); and the query targets'
    pixels (N-1, H, W)."""
    toks, imgs = bank.tokens[task], bank.images[task]
    n = len(toks) - 1
    rows = [vs.sentence(toks[i, 0], toks[i, 1], toks[i + 1, 0], toks[i + 1, 1]) for i in range(n)]
    return np.asarray(rows, np.int64), imgs[1:n + 1, 1]


@torch.no_grad()
def evaluate(lm: Any, vq: zvq.VQVAE, bank: vs.PairBank) -> dict[str, dict[str, float]]:
    """Per task: loss (mean CE of the target image's tokens, teacher-forced, nats), psnr (dB, greedy generation
    decoded vs the true target pixels), vq_psnr (the tokenizer's own reconstruction of the target: the ceiling)."""
    lm.eval()
    res = {}
    n_tok = vq.config.tokens
    for task in vs.TASKS:
        rows, target = eval_sentences(bank, task)
        ids = torch.from_numpy(rows)
        logits = lm(input_ids=ids).logits[:, -n_tok - 1:-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -n_tok:].reshape(-1)).item()
        codes = greedy_image(lm, ids[:, :-n_tok], n_tok)
        gen = zvq.from_pixels(vq.decode(codes))[:, 0]
        ref = zvq.from_pixels(vq.decode(ids[:, -n_tok:] - vs.N_SPECIAL))[:, 0]
        truth = torch.from_numpy(target)
        res[task] = {"loss": round(loss, 4), "psnr": round(float(zvq.psnr(gen, truth).mean()), 3),
                     "vq_psnr": round(float(zvq.psnr(ref, truth).mean()), 3),
                     "token_acc": round(float((codes == ids[:, -n_tok:] - vs.N_SPECIAL).float().mean()), 4)}
    return res


class _Log:
    def __init__(self, progress: Any) -> None:
        self.console = getattr(progress, "console", None)
        self.last = 0.0

    def step(self, i: int, total: int, loss: float, stage: str) -> None:
        now = time.perf_counter()
        if self.console is not None and (now - self.last > 5 or i == total):
            self.last = now
            self.console.print(f"  {stage} step {i}/{total}  loss {loss:.3f}")


def _check_out(out: Path, cfg: DelvmConfig, force: bool) -> None:
    ckpt.refuse_existing_run(out, finished=out / "train_record.json", started=(out / "vq.safetensors", out / "teacher"),
                             resume=cfg.resume, force=force, finished_as="a finished DeLVM run", started_as="a DeLVM run")

