"""One SR tile two ways, per runtime: (a) the whole 8-step DDIM loop as one exported graph (`effai export srdiff_x2`,
the zoo card's unrolled forward) vs (b) the loop in Python/numpy around the exported encoder + step (`effai sr export`,
what `effai sr` and `effai bench` of an SR artifact run). Same 16x16 LR tile, interleaved rounds; ratio = (b) / (a).
The outputs differ only by torch's vs PIL's bicubic (PSNR between them is printed).

  python benchmarks/sr_loop.py --work /tmp/srw      # exports into --work what is not there yet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ("onnx", "executorch", "tflite")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sr_loop")
    ap.add_argument("--steps", type=int, default=8, help="the zoo card's forward is 8 steps (ARCH_STEPS)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/sr_loop.json")
    args = ap.parse_args()

    from effai.api import load_artifact
    from effai.data import sr as data
    from effai.superres import engine
    from effai.superres.export import export_sr
    from effai.superres.gate import psnr
    from effai.zoo.srdiff import ARCH_STEPS

    if args.steps != ARCH_STEPS:
        raise SystemExit(f"--steps must be {ARCH_STEPS}: the one-graph export unrolls that many")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lr = data.photo("chelsea")[100:116, 200:216]
    x = data.to_unit(lr).transpose(2, 0, 1)[None].copy()
    graphs, loops = {}, {}
    for t in TARGETS:
        g, s = work / "single" / f"srdiff_x2-{t}", work / f"{t}-fp32"
        if not (g / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "effai", "export", "srdiff_x2", "--target", t, "-o",
                            str(work / "single"), "--json"], check=True, capture_output=True)
        if not (s / engine.SR_JSON).is_file():
            export_sr("srdiff_x2", t, s, force=True)
        graphs[t], loops[t] = load_artifact(g), engine.artifact_model(s)
    times = {f"{t}-{k}": [] for t in TARGETS for k in ("graph", "loop")}
    outs = {}
    for t in TARGETS:   # warm-up, and the outputs compared
        outs[t] = (data.from_unit(graphs[t].run(x)[0][0].transpose(1, 2, 0)), engine.upscale(loops[t], lr, 2, 8))
    for _ in range(args.rounds):
        for t in TARGETS:
            t0 = time.perf_counter()
            graphs[t].run(x)
            times[f"{t}-graph"].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            engine.upscale(loops[t], lr, 2, args.steps)
            times[f"{t}-loop"].append((time.perf_counter() - t0) * 1e3)
    rows = {}
    for t in TARGETS:
        g, lp = float(np.median(times[f"{t}-graph"])), float(np.median(times[f"{t}-loop"]))
        rows[t] = {"graph_ms": g, "loop_ms": lp, "loop_over_graph": lp / g, "graph_runtime": graphs[t].runtime,
                   "loop_runtime": loops[t].runtime, "psnr_graph_vs_loop_db": psnr(*outs[t]),
                   "graph_all_ms": [round(v, 3) for v in times[f"{t}-graph"]],
                   "loop_all_ms": [round(v, 3) for v in times[f"{t}-loop"]]}
    result = {"model": "srdiff_x2", "lr_tile": [16, 16], "steps": args.steps, "rounds": args.rounds,
              "machine": platform.platform(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'target':12s} {'one graph ms':>12s} {'loop ms':>9s} {'loop/graph':>10s} {'PSNR graph vs loop':>19s}")
    for t, r in rows.items():
        print(f"{t:12s} {r['graph_ms']:12.2f} {r['loop_ms']:9.2f} {r['loop_over_graph']:10.2f} "
              f"{r['psnr_graph_vs_loop_db']:19.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
