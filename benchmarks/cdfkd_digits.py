"""Does CDFKD-MFS's collaboration pay off at small scale? Data-free distillation of 3 teachers into one multi-header
student vs the same loop with the best single teacher (1 header), on scikit-learn digits (held-out 20% split, never
seen by the data-free students), over several seeds; plus chance, the teachers, and the same student trained on the
real training split with cross-entropy (the upper bound a data-free method approaches).

    python benchmarks/cdfkd_digits.py                 # 3 seeds, 200 iterations (~17 min on 1 CPU thread)
    python benchmarks/cdfkd_digits.py --equal-compute # + the single teacher at 2x iterations (~+12 min)
    python benchmarks/cdfkd_digits.py --quick         # 2 seeds, 30 iterations: a smoke run, not evidence

Teachers (ResNet-10t/14t/18 at 16x16, trained with effai's `supervised` recipe, seed 0 = one shared split) are
trained into --teachers-dir when missing and reused otherwise; finished distillation runs of the same config in
--work are reused too. Prints mean +- std held-out top-1 and training minutes per variant and writes
benchmarks/results/cdfkd_digits.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from effai.data import datasets as data_mod
from effai.train.cdfkd import CdfkdConfig, train_cdfkd
from effai.zoo.cdfkd_student import build_multi_header
from effai.train.cdfkd.teachers import load_teachers
from effai.train.evaluation import evaluate
from effai.train.loop import train
from effai.train.recipes import make_config

TEACHERS = ("resnet10t", "resnet14t", "resnet18")
STUDENT, STUDENT_CHANNELS = "resnet10t", (16, 32, 64, 128)     # a quarter-width ResNet-10t (~1.2M params w/ headers)


def ensure_teachers(root: Path, size: int, epochs: int) -> list[Path]:
    paths = []
    for arch in TEACHERS:
        path = root / arch
        if not (path / "model.safetensors").is_file():
            print(f"training teacher {arch} into {path} ...", flush=True)
            train(make_config("supervised", student=arch, data="digits", input_size=size, epochs=epochs, seed=0,
                              out=str(path)), force=True)
        paths.append(path)
    return paths


def recorded_acc(path: Path) -> float:
    return json.loads((path / "train_record.json").read_text())["val_acc"]


def reuse(cfg: CdfkdConfig) -> dict[str, Any] | None:
    """A finished run of exactly this configuration in cfg.out (so --equal-compute only adds its own runs)."""
    path = Path(cfg.out) / "train_record.json"
    if not (path.is_file() and (Path(cfg.out) / "model.safetensors").is_file()):
        return None
    rec = json.loads(path.read_text())
    saved = {k: v for k, v in rec.get("config", {}).items() if k != "split_seed"}
    if saved != json.loads(json.dumps(cfg.to_dict())):
        return None
    return {"val_acc": rec["val_acc"], "val_acc_heads": rec["val_acc_heads"], "minutes": rec["minutes"],
            "history": rec["history"], "teacher_val_acc": [t["val_acc"] for t in rec["teachers"]]}


def real_data_student(size: int, seed: int, epochs: int, header_dims: list[int]) -> dict[str, Any]:
    """The same multi-header student, trained on the real training split with CE on every header (upper bound)."""
    full = data_mod.load("digits", size, 1)
    train_set, val_set = data_mod.split(full, 0.2, 0)
    torch.manual_seed(seed)
    model = build_multi_header(10, 1, size, STUDENT, backbone_kwargs={"channels": list(STUDENT_CHANNELS)},
                               header_dims=header_dims)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps, batch, step = epochs * (len(train_set) // 64), 64, 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(train_set), generator=g)
        model.train()
        for i in range(len(train_set) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = (data_mod.augment(train_set.x[idx].float() / 255, g, hflip=False, jitter=0.4) - 0.5) / 0.5
            for group in opt.param_groups:
                group["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / steps))
            logits, _ = model.forward_heads(x)
            loss = sum(F.cross_entropy(z, train_set.y[idx]) for z in logits) / len(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    minutes = (time.perf_counter() - t0) / 60
    acc = evaluate(model, val_set, torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.5).view(1, 1, 1, 1),
                   torch.device("cpu"))
    return {"val_acc": acc, "minutes": minutes}


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--real-epochs", type=int, default=10)
    ap.add_argument("--teachers-dir", default="runs/cdfkd_bench/teachers")
    ap.add_argument("--work", default="runs/cdfkd_bench")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cdfkd_digits.json"))
    ap.add_argument("--equal-compute", action="store_true",
                    help="also run the single teacher for 2x the iterations (>= CDFKD's wall-clock per run)")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 30 iterations: a smoke run, not evidence")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.iterations = 2, 30
    torch.set_num_threads(1)

    teachers = ensure_teachers(Path(args.teachers_dir), args.input_size, args.teacher_epochs)
    best = max(teachers, key=recorded_acc)   # by the teachers' own recorded held-out accuracy
    header_dims = [t.dim for t in load_teachers(tuple(str(t) for t in teachers))]
    variants = {"CDFKD-MFS (3 teachers, 3 headers)": (tuple(str(t) for t in teachers), args.iterations),
                f"single teacher ({best.name}, 1 header)": ((str(best),), args.iterations)}
    if args.equal_compute:
        variants[f"single teacher ({best.name}, 1 header), 2x iterations"] = ((str(best),), 2 * args.iterations)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    runs["real data, CE (upper bound)"] = []
    teacher_acc: list[float] = []
    for seed in range(args.seeds):
        for name, (specs, iterations) in variants.items():
            out = Path(args.work) / f"{'cdfkd' if len(specs) > 1 else 'single'}_{iterations}_seed{seed}"
            cfg = CdfkdConfig(teachers=specs, student=STUDENT, student_channels=STUDENT_CHANNELS, out=str(out),
                              iterations=iterations, batch_size=args.batch_size, seed=seed,
                              eval_every=max(1, iterations // 4))
            r = reuse(cfg) or train_cdfkd(cfg, force=True)
            if len(specs) > 1:
                teacher_acc = r["teacher_val_acc"]
            curve = [(h["iteration"], h["val_acc"]) for h in r["history"]]
            runs[name].append({"seed": seed, "val_acc": r["val_acc"], "val_acc_heads": r["val_acc_heads"],
                               "minutes": r["minutes"], "curve": curve})
            print(f"seed {seed}  {name:52s} top-1 {r['val_acc']:.3f}  heads {[round(a, 3) for a in r['val_acc_heads']]}"
                  f"  {r['minutes']:.1f} min", flush=True)
        r = real_data_student(args.input_size, seed, args.real_epochs, header_dims)
        runs["real data, CE (upper bound)"].append({"seed": seed, **r})
        print(f"seed {seed}  {'real data, CE (upper bound)':52s} top-1 {r['val_acc']:.3f}  {r['minutes']:.1f} min",
              flush=True)

    table = {"chance": {"top1": {"mean": 0.1, "std": 0.0}, "minutes": None}}
    for t, a in zip(teachers, teacher_acc):
        table[f"teacher {t.name}"] = {"top1": {"mean": a, "std": 0.0}, "minutes": None}
    for name, rows in runs.items():
        table[name] = {"top1": summarize([r["val_acc"] for r in rows]),
                       "minutes": summarize([r["minutes"] for r in rows])}
    print(f"\nheld-out top-1 on digits ({args.input_size}x{args.input_size}, 20% split seed 0), {args.seeds} seeds, "
          f"{args.iterations} iterations x (5 student + 1 generator steps), batch {args.batch_size}")
    print(f"{'variant':54s} {'top-1':>16s} {'minutes':>12s}")
    for name, row in table.items():
        top1 = f"{row['top1']['mean']:.3f} ± {row['top1']['std']:.3f}"
        mins = f"{row['minutes']['mean']:.1f} ± {row['minutes']['std']:.1f}" if row["minutes"] else "-"
        print(f"{name:54s} {top1:>16s} {mins:>12s}")
    result = {"benchmark": "cdfkd_digits", "settings": vars(args), "teachers": [str(t) for t in teachers],
              "student": {"backbone": STUDENT, "channels": list(STUDENT_CHANNELS)}, "table": table, "runs": runs,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
