"""Heterogeneous distillation on real data: CE vs vanilla KD vs OFA-KD, a ViT teacher into a CNN student and a CNN
teacher into a token student, on scikit-learn digits (held-out 20% split, the same split for every run), over
several seeds, measured in one run.

    python benchmarks/ofa_digits.py --seeds 3 --epochs 15 --pair vit_pico:resnet10t --pair resnet18:vit_pico

Teachers are trained first with effai's `supervised` recipe (reused when present under --runs). Every student
variant shares its hyper-parameters (recipe defaults; AdamW for token students) and differs only in the loss:
    CE   L = CE_smooth(z_s, y)
    KD   L = CE_smooth + KL(p_t || p_s), T = 1                 (Hinton 2015; VanillaKD's defaults)
    OFA  L = CE_smooth + L_OFA(z_s) + sum_exits L_OFA(proj(f))  (Hao et al. 2023, eps = 1, T = 1)
Prints mean +- std held-out top-1 and training minutes per variant, and the per-seed paired differences (same seed:
same initialization, data order and augmentation), and writes benchmarks/results/ofa_digits.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from effai.train.loop import train
from effai.train.recipes import make_config

VARIANTS = {"CE": ("ghostnetv3", False), "KD": ("kd", True), "OFA": ("ofa", True)}   # recipe, uses the teacher


def ensure_teacher(root: Path, arch: str, epochs: int, common: dict[str, Any]) -> tuple[Path, float, float]:
    out = root / f"teacher_{arch}_{common['input_size']}"
    record = out / "train_record.json"
    if record.is_file():
        rec = json.loads(record.read_text())
        if rec["config"]["epochs"] == epochs:
            return out, rec["val_acc"], -1.0
    print(f"training teacher {arch} ({epochs} epochs) into {out} ...", flush=True)
    t0 = time.perf_counter()
    res = train(make_config("supervised", student=arch, epochs=epochs, out=str(out), seed=0, **common), force=True)
    return out, res["val_acc"], (time.perf_counter() - t0) / 60


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", action="append", default=None, help="TEACHER:STUDENT (repeatable)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15, help="student epochs")
    ap.add_argument("--teacher-epochs", default="", help="ARCH=N,... (default: 60 for token teachers, 15 otherwise)")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=Path("runs/ofa_digits"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ofa_digits.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [tuple(p.split(":")) for p in (args.pair or ["vit_pico:resnet10t", "resnet18:vit_pico"])]
    t_epochs = {k: int(v) for k, v in (kv.split("=") for kv in args.teacher_epochs.split(",") if kv)}
    common = {"data": "digits", "channels": 1, "input_size": args.input_size, "split_seed": 0}

    teachers: dict[str, dict[str, Any]] = {}
    for t_arch, _ in pairs:
        if t_arch not in teachers:
            epochs = t_epochs.get(t_arch, 60 if t_arch.startswith(("vit", "mixer", "deit", "swin")) else 15)
            path, acc, minutes = ensure_teacher(args.runs, t_arch, epochs, common)
            teachers[t_arch] = {"path": str(path), "val_acc": acc, "epochs": epochs, "minutes": minutes}
            print(f"teacher {t_arch}: held-out {100 * acc:.2f}%", flush=True)

    rows: list[dict[str, Any]] = []
    for t_arch, s_arch in pairs:
        for seed in range(args.seeds):
            for name, (recipe, with_teacher) in VARIANTS.items():
                out = args.runs / f"{t_arch}-{s_arch}" / f"{name}_seed{seed}"
                t0 = time.perf_counter()
                cfg = make_config(recipe, student=s_arch, epochs=args.epochs, seed=seed, out=str(out),
                                  teacher=teachers[t_arch]["path"] if with_teacher else None, **common)
                res = train(cfg, force=True)
                minutes = (time.perf_counter() - t0) / 60
                rows.append({"teacher": t_arch, "student": s_arch, "variant": name, "seed": seed,
                             "val_acc": res["val_acc"], "minutes": minutes, "optimizer": cfg.optimizer, "lr": cfg.lr})
                print(f"{t_arch} -> {s_arch}  {name:<4} seed {seed}: {100 * res['val_acc']:.2f}%  ({minutes:.1f} min)",
                      flush=True)

    print(f"\nscikit-learn digits, held-out 20% (359 images, split seed 0), input {args.input_size}px, "
          f"{args.epochs} student epochs, {args.seeds} seeds, {torch.get_num_threads()} thread(s)\n")
    summary: list[dict[str, Any]] = []
    for t_arch, s_arch in pairs:
        t = teachers[t_arch]
        print(f"{t_arch} (teacher, {100 * t['val_acc']:.2f}%) -> {s_arch}")
        by = {v: [r for r in rows if (r["teacher"], r["student"], r["variant"]) == (t_arch, s_arch, v)] for v in VARIANTS}
        for v, rs in by.items():
            accs = [r["val_acc"] for r in rs]
            mins = statistics.mean(r["minutes"] for r in rs)
            print(f"  {v:<4} top-1 {mean_std(accs):>15} %   {mins:.1f} min/run")
            summary.append({"teacher": t_arch, "student": s_arch, "variant": v, "mean": statistics.mean(accs),
                            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "minutes": mins})
        for a, b in (("OFA", "CE"), ("OFA", "KD"), ("KD", "CE")):
            diffs = [x["val_acc"] - y["val_acc"] for x, y in zip(by[a], by[b])]
            print(f"  {a} - {b} (paired by seed): {mean_std(diffs)} points")
            summary.append({"teacher": t_arch, "student": s_arch, "diff": f"{a}-{b}", "mean": statistics.mean(diffs),
                            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                    "args": {k: str(v) for k, v in vars(args).items()}, "teachers": teachers,
                                    "summary": summary, "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
