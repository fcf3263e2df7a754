"""SRDiff vs SAM-DiffSR vs bicubic on held-out scikit-image photos: PSNR / SSIM (skimage.metrics) over training seeds
and DDIM step counts, a results JSON and a picture grid (LR, bicubic, SRDiff, SAM-DiffSR, HR).

The runs come from `effai train sr` (one per method and seed, same options otherwise), e.g.
  effai train sr --out benchmarks/runs/sr/x2-srdiff-s0 --iterations 500 --seed 0 --set method=srdiff
  effai train sr --out benchmarks/runs/sr/x2-samdiffsr-s0 --iterations 500 --seed 0 --set method=sam-diffsr
then: python benchmarks/sam_diffsr.py --runs benchmarks/runs/sr --scale 2 --seeds 0,1,2 --steps 4,8,20
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

METHODS = {"srdiff": "srdiff", "sam-diffsr": "samdiffsr"}


def metrics(hr: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return (float(peak_signal_noise_ratio(hr, out, data_range=255)),
            float(structural_similarity(hr, out, channel_axis=2, data_range=255)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="benchmarks/runs/sr")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="4,8,20")
    ap.add_argument("--size", type=int, default=64, help="HR side of each held-out crop")
    ap.add_argument("--per-photo", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/sam_diffsr.json")
    ap.add_argument("--grid", default="docs/superres_grid.png")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from effai.data import sr as data
    from effai.superres import engine

    seeds = [int(s) for s in args.seeds.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    crops = data.eval_crops(args.scale, args.size, args.per_photo)
    result: dict = {"machine": f"{platform.machine()} {platform.processor() or ''} (2-core shared CPU host)".strip(),
                    "scale": args.scale, "crops": [c[0] for c in crops], "crop_hr_size": args.size,
                    "held_out_photos": list(data.HELDOUT_PHOTOS), "seeds": seeds, "steps": steps_list,
                    "sampler_seed": 0, "rows": []}
    bic = [metrics(hr, data.from_unit(data.upsample(data.to_unit(lr), args.scale))) for _, hr, lr in crops]
    result["bicubic"] = {"psnr": float(np.mean([b[0] for b in bic])), "ssim": float(np.mean([b[1] for b in bic]))}
    outputs: dict = {}
    for method, tag in METHODS.items():
        for seed in seeds:
            run = Path(args.runs) / f"x{args.scale}-{tag}-s{seed}"
            if not (run / "model.safetensors").is_file():
                print(f"skip {run}: no model.safetensors")
                continue
            model = engine.torch_model(run)
            rec = json.loads((run / "train_record.json").read_text())
            for steps in steps_list:
                t0 = time.perf_counter()
                per = []
                for name, hr, lr in crops:
                    out = engine.upscale(model, lr, args.scale, steps=steps, seed=0)
                    per.append(metrics(hr, out))
                    outputs[(method, seed, steps, name)] = out
                sec = (time.perf_counter() - t0) / len(crops)
                row = {"method": method, "seed": seed, "steps": steps, "psnr": float(np.mean([p[0] for p in per])),
                       "ssim": float(np.mean([p[1] for p in per])), "seconds_per_crop_torch": sec,
                       "iterations": rec.get("iterations"), "train_minutes": rec.get("minutes"),
                       "val_loss": rec.get("val_loss")}
                result["rows"].append(row)
                print(json.dumps(row))
    summary = []
    for method in METHODS:
        for steps in steps_list:
            rows = [r for r in result["rows"] if r["method"] == method and r["steps"] == steps]
            if rows:
                ps, ss = [r["psnr"] for r in rows], [r["ssim"] for r in rows]
                summary.append({"method": method, "steps": steps, "seeds": len(rows), "psnr_mean": float(np.mean(ps)),
                                "psnr_std": float(np.std(ps)), "ssim_mean": float(np.mean(ss)),
                                "ssim_std": float(np.std(ss))})
    result["summary"] = summary
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"bicubic": result["bicubic"], "summary": summary}, indent=1))
    if args.grid:
        grid(crops, outputs, args, seeds[0], 8 if 8 in steps_list else steps_list[0])


def grid(crops: list, outputs: dict, args: argparse.Namespace, seed: int, steps: int) -> None:
    """Rows = crops; columns = LR (nearest), bicubic, SRDiff, SAM-DiffSR, HR; each cell upscaled 3x (nearest)."""
    from PIL import Image, ImageDraw

    from effai.data import sr as data

    z, gap, head = 3, 4, 14
    s = args.size * z
    cols = ["LR", "bicubic", f"SRDiff ({steps} st)", f"SAM-DiffSR ({steps} st)", "HR"]
    picked = crops[: min(4, len(crops))]
    canvas = Image.new("RGB", (len(cols) * (s + gap), head + len(picked) * (s + gap)), "white")
    d = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        d.text((j * (s + gap) + 2, 1), c, fill="black")
    for i, (name, hr, lr) in enumerate(picked):
        cells = [np.kron(lr, np.ones((args.scale, args.scale, 1), np.uint8)),
                 data.from_unit(data.upsample(data.to_unit(lr), args.scale)),
                 outputs.get(("srdiff", seed, steps, name)), outputs.get(("sam-diffsr", seed, steps, name)), hr]
        for j, cell in enumerate(cells):
            if cell is None:
                continue
            im = Image.fromarray(cell).resize((s, s), Image.NEAREST)
            canvas.paste(im, (j * (s + gap), head + i * (s + gap)))
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.grid)
    print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
