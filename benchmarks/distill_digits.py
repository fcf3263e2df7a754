"""Does the GhostNetV3 recipe's machinery pay off at small scale? CE-only vs KD vs DKD vs DIST students and
1 vs 3 training-time branches, on scikit-learn digits (held-out 20% split), over several seeds; plus the fold
speedup (training form vs deploy form latency, measured in the same run).

    python benchmarks/distill_digits.py --seeds 3 --epochs 15 --teacher runs/digits_teacher

The teacher is trained with effai's own `supervised` recipe (ResNet-18) when --teacher does not exist yet.
Prints mean +- std held-out top-1 per variant and writes benchmarks/results/distill_digits.json; with --variants
a subset (same --epochs/--seeds) replaces only those rows there and dates them (`measured`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from effai.train.loop import train
from effai.train.recipes import make_config

VARIANTS = {  # name -> overrides of the ghostnetv3 recipe
    "CE only (3 branches)": {"teacher": None},
    "KD (3 branches)": {"loss": "kd"},
    "DKD (3 branches)": {"loss": "dkd"},
    "DIST (3 branches)": {"loss": "dist"},
    "KD (1 branch)": {"loss": "kd", "num_branches": 1, "scale_branch": False, "identity_bn": False},
}


def ensure_teacher(path: Path, epochs: int) -> Path:
    if not (path / "model.safetensors").is_file():
        print(f"training the teacher into {path} ...", flush=True)
        train(make_config("supervised", student="resnet18", data="digits", epochs=epochs, out=str(path)))
    return path


def fold_speedup(width: float = 0.5, size: int = 64, channels: int = 1, runs: int = 30) -> dict[str, float]:
    """Median forward latency (batch 1, torch's thread setting) of the 3-branch training form vs its folded deploy form."""
    from effai.export.fold import fold
    from effai.zoo.ghostnetv3 import GhostNetV3

    torch.manual_seed(0)
    model = GhostNetV3(width=width, num_classes=10, in_chans=channels).eval()
    x = torch.randn(1, channels, size, size)

    def median_ms(m: torch.nn.Module) -> float:
        times = []
        with torch.no_grad():
            for i in range(runs + 5):
                t0 = time.perf_counter()
                m(x)
                if i >= 5:
                    times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    train_ms = median_ms(model)
    fold(model, (x,))
    deploy_ms = median_ms(model)
    return {"train_form_ms": train_ms, "deploy_form_ms": deploy_ms, "speedup": train_ms / deploy_ms,
            "input": f"1x{channels}x{size}x{size}", "width": width}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--teacher", type=Path, default=Path("runs/digits_teacher"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_distill"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variant names to run")
    args = ap.parse_args()
    teacher = ensure_teacher(args.teacher, 15)
    results: dict[str, list[float]] = {}
    for name in [v for v in args.variants.split(",") if v]:
        over = {"teacher": str(teacher), **VARIANTS[name]}
        for seed in range(args.seeds):
            out = args.out / f"{name.split()[0].lower()}-{over.get('num_branches', 3)}b-s{seed}"
            t0 = time.perf_counter()
            r = train(make_config("ghostnetv3", data="digits", epochs=args.epochs, seed=seed, out=str(out), **over))
            results.setdefault(name, []).append(r["val_acc"])
            print(f"{name:<22} seed {seed}: {r['val_acc']:.2%}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    speed = fold_speedup()
    print(f"\nheld-out top-1 on digits (20% split, 359 images), {args.epochs} epochs, {args.seeds} seeds")
    for name, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {name:<22} {100 * statistics.mean(accs):6.2f} +- {100 * sd:4.2f}   {[round(100 * a, 2) for a in accs]}")
    print(f"\nfold speedup ({speed['input']}, width {speed['width']}): training form {speed['train_form_ms']:.2f} ms, "
          f"deploy form {speed['deploy_form_ms']:.2f} ms, ratio {speed['speedup']:.2f}x")
    dest = Path(__file__).parent / "results" / "distill_digits.json"
    dest.parent.mkdir(exist_ok=True)
    old = json.loads(dest.read_text()) if dest.is_file() else {}
    if old.get("epochs") == args.epochs and old.get("seeds") == args.seeds:
        results = {**old.get("accuracy", {}), **results}      # a --variants subset re-runs those rows only
        when = {**old.get("measured", {}), **{n: time.strftime("%Y-%m-%d") for n in results if n not in old.get(
            "accuracy", {}) or n in args.variants.split(",")}}
    else:
        when = {n: time.strftime("%Y-%m-%d") for n in results}
    dest.write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "accuracy": results, "measured": when,
                                "fold_speedup": speed, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
