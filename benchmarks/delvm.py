"""DeLVM on a CPU (issue 17): tail-task handling (augment vs repeat vs none) and logit KD vs scratch, over seeds.

    OMP_NUM_THREADS=1 python benchmarks/delvm.py                          # 3 seeds, results/delvm.json + docs table
    OMP_NUM_THREADS=1 python benchmarks/delvm.py --seeds 0 --steps 200     # quick look

One VQ tokenizer (seed 0) is shared by every run. Per seed: the 16-token-per-image LM (hidden 64, 2 layers) is trained
for --steps with each tail mode; the teacher (hidden 128, 3 layers, 2x steps, tail mode augment) is trained once and
distilled into the small LM (CE + KD, same steps and data as the augment run, which is the scratch baseline).
Recorded per held-out task: the target image's token loss (teacher-forced) and the PSNR of its greedy generation
(one example pair + the query input in context) decoded by the VQ decoder; vq_psnr is the tokenizer's ceiling.
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

from effai.data.visual_sentences import TASKS  # noqa: E402
from effai.files import atomic_write  # noqa: E402
from effai.train.delvm import DelvmConfig, train_delvm  # noqa: E402

BEGIN, END = "<!-- delvm-table:begin -->", "<!-- delvm-table:end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "delvm"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "delvm.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "delvm.md"))
    a = ap.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model on a shared 2-core host: 1 thread is many times faster than 2
    try:
        run(a)
    finally:
        torch.set_num_threads(threads)


def run(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    base = DelvmConfig(steps=a.steps)
    first = train_delvm(DelvmConfig(out=str(out / "vq-and-teacher"), steps=2 * a.steps, lm_hidden=base.teacher_hidden,
                                    lm_layers=base.teacher_layers, seed=0), force=True)
    vq, teacher = first["vq_path"], first["model_path"]
    rows: dict[str, list[dict]] = {}
    rows["teacher (128x3, 2x steps)"] = [first["eval"]]
    for seed in seeds:
        for mode in ("augment", "repeat", "none"):
            r = train_delvm(DelvmConfig(out=str(out / f"{mode}-s{seed}"), vq=vq, tail_mode=mode, seed=seed,
                                        steps=a.steps), force=True)
            rows.setdefault(f"tail {mode}" + (" (= KD scratch)" if mode == "augment" else ""), []).append(r["eval"])
            print(f"seed {seed} {mode}: " + json.dumps(r["eval"]), flush=True)
        r = train_delvm(DelvmConfig(out=str(out / f"kd-s{seed}"), vq=vq, tail_mode="augment", seed=seed, kd=True,
                                    teacher=teacher, steps=a.steps), force=True)
        rows.setdefault("KD from teacher (augment)", []).append(r["eval"])
        print(f"seed {seed} kd: " + json.dumps(r["eval"]), flush=True)
    minutes = (time.perf_counter() - t0) / 60
    result = {"seeds": seeds, "steps": a.steps, "config": base.to_dict(), "rows": rows, "minutes": minutes,
              "vq_psnr": {t: first["eval"][t]["vq_psnr"] for t in TASKS}}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(a.results), json.dumps(result, indent=2) + "\n")
    table = markdown(rows, result["vq_psnr"], seeds, a.steps, minutes)
    print(table)
    docs = Path(a.docs)
    if docs.is_file() and BEGIN in (text := docs.read_text()):
        head, rest = text.split(BEGIN, 1)
        atomic_write(docs, head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def markdown(rows: dict[str, list[dict]], vq_psnr: dict[str, float], seeds: list[int], steps: int,
             minutes: float) -> str:
    head = "| run | " + " | ".join(f"{t} loss | {t} PSNR" for t in TASKS) + " |"
    sep = "|---|" + "---:|" * (2 * len(TASKS))
    lines = [f"Held-out, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), {steps} LM steps, mean ± std over "
             f"seeds; loss = target-image token CE (nats), PSNR (dB) of the greedy generation; {minutes:.1f} min on "
             "the 2-core shared CPU host, 1 thread.", "", head, sep]
    for name, evs in rows.items():
        cells = [f"{_ms([e[t]['loss'] for e in evs])} | {_ms([e[t]['psnr'] for e in evs])}" for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| VQ reconstruction (ceiling) | " + " | ".join(f"- | {vq_psnr[t]:.2f}" for t in TASKS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
