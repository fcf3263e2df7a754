"""ADEM-VL vs the LLaVA-style prefix baseline, in one run, over seeds (issue 16).

    OMP_NUM_THREADS=1 python benchmarks/ademvl.py                      # 3 seeds, results/ademvl.json
    OMP_NUM_THREADS=1 python benchmarks/ademvl.py --seeds 0 --steps 300  # quick look

Per seed: the tiny LM (stage 1) is trained once, then both modes train the vision-language stage on it with the same
data, split, steps and batch (ADEM-VL: projector + fusion offsets; prefix: projector). Recorded: held-out exact-match
accuracy (all and per question kind), trainable parameters, median train step time. Then prefill latency (batch 1,
one prompt, median of --reps forwards, 1 thread) as the number of visual tokens grows, for the trained tiny LM and a
wider random-init Llama of the same classes (latency does not depend on weights), plus the multiply-add cost model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from effai.data import vqa  # noqa: E402
from effai.files import atomic_write  # noqa: E402
from effai.train.ademvl import AdemvlConfig, train_ademvl  # noqa: E402
from effai.zoo import ademvl as zm  # noqa: E402

SCALES = {21: (4, 2, 1), 85: (8, 4, 2, 1), 341: (16, 8, 4, 2, 1), 1365: (32, 16, 8, 4, 2, 1)}


def train_both(seed: int, steps: int, lm_steps: int, root: Path) -> dict:
    rows = {}
    for mode in ("adem", "prefix"):
        lm = None if mode == "adem" else str(root / f"seed{seed}" / "adem" / "lm")
        cfg = AdemvlConfig(out=str(root / f"seed{seed}" / mode), mode=mode, lm=lm, lm_steps=lm_steps, steps=steps,
                           seed=seed, split_seed=seed, eval_every=10 ** 9)
        t = time.perf_counter()
        r = train_ademvl(cfg, force=True)
        rows[mode] = {"val_acc": r["val_acc"], "val_acc_by_kind": r["val_acc_by_kind"],
                      "trainable_params": r["trainable_params"], "projector_params": r["projector_params"],
                      "fusion_params": r["fusion_params"], "train_step_ms": r["train_step_ms"],
                      "num_visual": r["num_visual"], "wall_s": time.perf_counter() - t}
        print(f"seed {seed} {mode}: {json.dumps(rows[mode])}", flush=True)
    return rows


@torch.no_grad()
def prefill_ms(model: zm.AdemVL, visual: torch.Tensor, ids: torch.Tensor, reps: int) -> float:
    times = []
    for i in range(reps + 3):
        t = time.perf_counter()
        if model.mode == "adem":
            model.set_visual(visual)
            model.lm(input_ids=ids, use_cache=True)
            model.set_visual(None)
        else:
            model.lm(inputs_embeds=model.prefix_embeds(visual, ids), use_cache=True)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def latency_sweep(lm_dir: Path, reps: int, wide: bool) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = vqa.load_tokenizer(lm_dir)
    trunk, channels, size, _, _ = zm.build_trunk("ghostnetv3_050.digits", "blocks.6")
    ids = torch.tensor([tok(vqa.prompt(vqa.Q_DIGIT))["input_ids"]])
    rows = []
    for nv, scales in SCALES.items():
        for mode in ("adem", "prefix"):
            if wide:
                torch.manual_seed(0)
                lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536,
                                                  num_hidden_layers=4, num_attention_heads=8,
                                                  max_position_embeddings=2048)).eval()
            else:
                lm = zm.load_causal_lm(lm_dir)
            model = zm.AdemVL(trunk, lm, tok, feature_dim=channels, scales=scales, mode=mode, input_size=size).eval()
            cfg = lm.config
            visual = torch.randn(1, nv, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
            ms = prefill_ms(model, visual, ids, reps)
            macs = zm.prefill_flops(mode, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                                    ids.shape[1], nv)
            rows.append({"lm": "wide random-init (512 x 4)" if wide else "trained tiny (64 x 2)", "mode": mode,
                         "visual_tokens": nv, "text_tokens": ids.shape[1], "prefill_ms_median": ms,
                         "model_macs": macs})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def step_time_ab(lm_dir: Path, reps: int) -> dict:
    """Train-step time of both modes on the same batch (32 questions, real digit images), alternated ABAB so load
    changes on a shared machine fall on both sides; median ms per mode."""
    from effai.train.ademvl.loop import Batches, trunk_features, vl_loss

    tok = vqa.load_tokenizer(lm_dir)
    trunk, channels, size, mean, std = zm.build_trunk("ghostnetv3_050.digits", "blocks.6")
    data = vqa.build_offline(size[1], size[0], photos=False)
    models = {m: zm.AdemVL(trunk, zm.load_causal_lm(lm_dir), tok, feature_dim=channels, scales=(4, 2, 1), mode=m,
                           input_size=size).train() for m in ("adem", "prefix")}
    img, ids, labels, mask = Batches(data, tok, 32, 0).next()
    fm = trunk_features(models["adem"], data.images[img], mean, std)
    times: dict[str, list[float]] = {"adem": [], "prefix": []}
    for i in range(reps + 2):
        for mode, model in (models.items() if i % 2 == 0 else reversed(list(models.items()))):
            params = [p for p in model.parameters() if p.requires_grad]
            t = time.perf_counter()
            loss = vl_loss(model, fm, ids, labels, mask)
            torch.autograd.grad(loss, params)
            if i >= 2:
                times[mode].append(time.perf_counter() - t)
    return {m: 1000 * statistics.median(v) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lm-steps", type=int, default=400)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--root", type=Path, default=Path("runs/bench_ademvl"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ademvl.json")
    ap.add_argument("--latency-only", type=Path, metavar="LM_DIR", help="only the prefill sweep, with this trained "
                    "tiny LM folder (a run's lm/); writes --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.latency_only:
        steps = step_time_ab(args.latency_only, args.reps)
        print(json.dumps({"train_step_ms_median_ab": steps}), flush=True)
        latency = latency_sweep(args.latency_only, args.reps, wide=False) + \
            latency_sweep(args.latency_only, max(5, args.reps // 3), wide=True)
        atomic_write(args.out, json.dumps({"machine": "2-core CPU host shared with other jobs, torch threads 1",
                                           "command": "OMP_NUM_THREADS=1 python benchmarks/ademvl.py "
                                                      + " ".join(sys.argv[1:]),
                                           "train_step_ms_median_ab": steps, "prefill": latency,
                                           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                          indent=2) + "\n")
        return
    per_seed = {s: train_both(s, args.steps, args.lm_steps, args.root) for s in args.seeds}
    summary = {}
    for mode in ("adem", "prefix"):
        accs = [per_seed[s][mode]["val_acc"] for s in args.seeds]
        steps = [per_seed[s][mode]["train_step_ms"] for s in args.seeds]
        summary[mode] = {"val_acc_mean": statistics.mean(accs), "val_acc_min": min(accs), "val_acc_max": max(accs),
                         "train_step_ms_median_of_seeds": statistics.median(steps),
                         "trainable_params": per_seed[args.seeds[0]][mode]["trainable_params"]}
    lm_dir = args.root / f"seed{args.seeds[0]}" / "adem" / "lm"
    latency = latency_sweep(lm_dir, args.reps, wide=False) + latency_sweep(lm_dir, max(5, args.reps // 3), wide=True)
    result = {"machine": "2-core CPU host shared with other jobs, torch threads 1",
              "command": "OMP_NUM_THREADS=1 python benchmarks/ademvl.py " + " ".join(sys.argv[1:]),
              "config": {"steps": args.steps, "lm_steps": args.lm_steps, "seeds": args.seeds, "reps": args.reps},
              "per_seed": per_seed, "summary": summary, "prefill": latency,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
