"""Quantized SR artifacts vs fp32 on this host: the PSNR drop (the export's PSNR gate, held-out photos) and the
latency per image of the tiled sampler in each runtime, fp32 of the same target timed in the same run (interleaved
rounds), ratio = fp32 median / quantized median.

  python benchmarks/sr_quant.py --work /tmp/sr_quant      # exports srdiff_x2 there (reuses dirs already exported)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

COMBOS = [("onnx", "fp32"), ("onnx", "int8"), ("onnx", "int8-dynamic"),
          ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8-dynamic"), ("tflite", "int8-weight"),
          ("executorch", "fp32"), ("executorch", "int8"), ("executorch", "int8-dynamic"), ("executorch", "int8-weight")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="srdiff_x2")
    ap.add_argument("--work", default="/tmp/sr_quant", help="artifact dirs <target>-<precision> (reused if there)")
    ap.add_argument("--size", default="64x48", help="LR WxH of the timed image (a crop of chelsea)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="timed images per artifact, interleaved across artifacts")
    ap.add_argument("--out", default="benchmarks/results/sr_quant.json")
    args = ap.parse_args()

    from effai.files import read_json
    from effai.superres import engine
    from effai.superres.bench import lr_image, parse_size
    from effai.superres.export import export_sr

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for target, prec in COMBOS:
        d = work / f"{target}-{prec}"
        meta = read_json(d / engine.SR_JSON) if (d / engine.SR_JSON).is_file() else None
        if meta is None or meta.get("precision") != prec or meta.get("source") != args.model:
            t0 = time.perf_counter()
            meta = export_sr(args.model, target, d, prec, force=True, max_psnr_drop=100.0)   # record, do not gate
            print(f"exported {d} in {time.perf_counter() - t0:.0f} s", flush=True)
        gate = meta.get("psnr_gate")
        if gate is not None and "fidelity_psnr_db" not in gate:   # exported before the fidelity figure existed
            from effai.superres.gate import psnr_gate

            gate = psnr_gate(engine.torch_model(args.model), engine.artifact_model(d), 100.0)
        rows[d.name] = {"target": target, "precision": prec, "dir": str(d),
                        "sampler_parity": meta.get("sampler_parity"), "psnr_gate": gate,
                        "psnr_drop_db": gate["drop_db"] if gate else 0.0,
                        "bytes": sum(p.stat().st_size for p in d.rglob("*") if p.is_file())}
    w, h = parse_size(args.size)
    lr = lr_image(w, h)
    models = {k: engine.artifact_model(r["dir"]) for k, r in rows.items()}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for k, m in models.items():   # warm-up
        engine.upscale(m, lr, int(m.spec["scale"]), args.steps)
    for _ in range(args.rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            engine.upscale(m, lr, int(m.spec["scale"]), args.steps)
            times[k].append((time.perf_counter() - t0) * 1e3)
    for k, r in rows.items():
        r["ms_per_image"] = float(np.median(times[k]))
        r["ms_all"] = [round(x, 2) for x in times[k]]
        base = rows[f"{r['target']}-fp32"]
        r["speedup_vs_fp32"] = float(np.median(times[f"{r['target']}-fp32"])) / r["ms_per_image"]
        r["size_ratio_vs_fp32"] = r["bytes"] / base["bytes"]
    ref = next((r["psnr_gate"]["reference_psnr_db"] for r in rows.values() if r["psnr_gate"]), None)
    result = {"model": args.model, "lr_size": [w, h], "steps": args.steps, "rounds": args.rounds,
              "fp32_psnr_db": ref, "machine": platform.platform(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'artifact':28s} {'PSNR drop dB':>12s} {'vs fp32 dB':>10s} {'ms/image':>9s} {'x fp32':>7s} {'size x':>7s}")
    for k, r in rows.items():
        fid = (r["psnr_gate"] or {}).get("fidelity_psnr_db")
        print(f"{k:28s} {r['psnr_drop_db']:12.4f} {fid if fid is not None else 'identical':>10} "
              f"{r['ms_per_image']:9.1f} {r['speedup_vs_fp32']:7.2f} {r['size_ratio_vs_fp32']:7.2f}")
    print(f"fp32 PSNR (torch = fp32 artifacts): {ref} dB; wrote {args.out}")


if __name__ == "__main__":
    main()
