"""DeViT at small scale: a monolithic ViT teacher vs its 2- and 4-part decompositions on scikit-learn digits
(held-out 20% split), each also with stage 2 pruning (half the MLP neurons and a third of the heads of every block)
and its control (unpruned, as many DEKD epochs as the pruned run's DEKD + recovery), all measured in the same run on
this host.

    python benchmarks/devit.py            # ~35 min on 1 thread (a loaded 2-core host)
    python benchmarks/devit.py --reuse --work DIR    # the teacher and vit_pico of an earlier run in DIR (~20 min)
    python benchmarks/devit.py --quick    # ~3 min: a smoke run, numbers not meaningful

Reports, per model: held-out top-1, parameters per device, per-device compute latency, end-to-end latency of the
REAL multi-process run (one process per device + coordinator, gloo over TCP on localhost, batch 1), the same
latency if every device had its own core (slowest device + fusion), and the ratio to the teacher's latency
(teacher: one process, same thread count, batch 1). Writes benchmarks/results/devit_digits.json.

The teacher (vit_tiny) is trained here with AdamW (DeiT-style), as `effai train supervised --student vit_tiny` also
does (AdamW is the default for token models). Every process runs with 1 thread; the host's cores are shared by all
device processes, so with more devices than free cores the measured end-to-end latency includes their contention.
The run also measures the bare gloo round trip (request + one CLS feature) between two processes: the floor every
end-to-end number sits on. Run it on a quiet machine: the latencies are measured back to back, not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effai.devit_runtime import RunSpec, load_run, run_local
from effai.devit_runtime.inputs import load_stream
from effai.files import atomic_write
from effai.data import datasets as data_mod
from effai.train.devit import DevitConfig, stages, train_devit
from effai.train.models import build_student, save_model
from effai.train.recipes import make_config

SIZE = 32


def train_teacher(out: Path, arch: str, epochs: int, lr: float) -> dict:
    """A ViT on digits with AdamW + cosine, written as an effai checkpoint (card + held-out split)."""
    cfg = make_config("supervised", student=arch, data="digits", input_size=SIZE, channels=1, out=str(out),
                      epochs=epochs, fold=False)
    full = data_mod.load("digits", SIZE, 1)
    train, val = data_mod.split(full, cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    model, card = build_student(cfg, full.classes)
    norm = stages.Norm(torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1),
                       torch.device("cpu"))
    opts = DevitConfig(teacher="-", batch_size=64, weight_decay=0.05, jitter=0.2)

    def step(x: torch.Tensor, y: torch.Tensor):
        z = model(x)
        return F.cross_entropy(z, y, label_smoothing=0.1), z, {}

    t0 = time.perf_counter()
    rows = stages.fit(f"teacher {arch}", [model], step, train, model, val, epochs=epochs, lr=lr, cfg=opts, norm=norm,
                      seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    res = save_model(model.eval(), card, cfg, out, val, {"dataset": {"source": "digits", "train": len(train),
                     "val": len(val)}, "history": rows, "world_size": 1}, "raw")
    return {"val_acc": res["val_acc"], "seconds": round(time.perf_counter() - t0, 1), "epochs": epochs}


def median_latency(model: torch.nn.Module, xs: torch.Tensor, warmup: int = 5) -> float:
    """Median ms of one batch-1 forward over the images in xs (after warmup)."""
    times = []
    with torch.no_grad():
        for i in range(warmup + xs.shape[0]):
            x = xs[i % xs.shape[0]: i % xs.shape[0] + 1]
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


PINGPONG = """
import statistics, sys, time, torch, torch.distributed as dist
from datetime import timedelta
rank, port = int(sys.argv[1]), int(sys.argv[2])
store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, timeout=timedelta(seconds=60), wait_for_workers=False)
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
ctrl, feat, rtt = torch.zeros(2, dtype=torch.int64), torch.zeros(1, 96), []
for i in range(220):
    t0 = time.perf_counter()
    if rank == 0:
        dist.send(ctrl, 1); dist.recv(feat, 1)
    else:
        dist.recv(ctrl, 0); dist.send(feat, 0)
    rtt.append((time.perf_counter() - t0) * 1e3)
if rank == 0:
    print(statistics.median(rtt[20:]))
dist.destroy_process_group()
"""


def gloo_round_trip_ms() -> float:
    """Median round trip of DeViT's per-batch exchange (a request, one 96-float CLS feature back) between two
    processes over gloo/TCP on this host: the network floor under every end-to-end number."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = subprocess.Popen([sys.executable, "-c", PINGPONG, "1", str(port)])
    try:
        out = subprocess.run([sys.executable, "-c", PINGPONG, "0", str(port)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    finally:
        peer.wait(timeout=30)
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~3 minute smoke run")
    ap.add_argument("--parts", default="2,4")
    ap.add_argument("--prune-parts", default="2,4", help="decompositions also run with pruning ('' for none)")
    ap.add_argument("--prune", default="0.5,0.34", help="fractions of MLP neurons,heads pruned per block (stage 2)")
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--small-epochs", type=int, default=20, help="epochs of the vit_pico the parts start from")
    ap.add_argument("--work", type=Path, default=None, help="keep the teacher and runs here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="reuse the teacher and vit_pico already trained in --work")
    ap.add_argument("--images", type=int, default=200, help="images streamed in each latency measurement")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "devit_digits.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    neurons, heads = (float(v) for v in args.prune.split(","))
    prune_kw = {"prune_neurons": neurons, "prune_heads": heads}
    # (key, parts, extra config). A pruned run trains prune_epochs more DEKD epochs; its control trains the same
    # number of DEKD epochs unpruned, so the table separates what pruning costs from what the extra epochs give.
    d = DevitConfig(teacher="-")
    control_kw = {"epochs": (1 if args.quick else d.epochs) + (1 if args.quick else d.prune_epochs)}
    variants = [(f"devit{n}", n, {}) for n in _ints(args.parts)]
    for n in _ints(args.prune_parts):
        variants += [(f"devit{n}p", n, prune_kw), (f"devit{n}c", n, control_kw)]
    quick_epochs = dict(finetune_epochs=1, epochs=1, ensemble_epochs=1, prune_epochs=1)
    stage_epochs = quick_epochs if args.quick else {}  # {}: the defaults
    teacher_epochs = 3 if args.quick else args.teacher_epochs
    small_epochs = 2 if args.quick else args.small_epochs
    images = 30 if args.quick else args.images
    work = args.work or Path(tempfile.mkdtemp(prefix="effai-devit-bench-"))
    t_start = time.perf_counter()

    # --- training (or the earlier run's models) ---------------------------------------------------------------------
    teacher_dir, small_dir = work / "teacher", work / "pico"
    records = json.loads((work / "train.json").read_text()) if args.reuse else {}
    if not args.reuse:
        print(f"teacher vit_tiny, {teacher_epochs} epochs ...", flush=True)
        records["teacher"] = train_teacher(teacher_dir, "vit_tiny", teacher_epochs, lr=1e-3)
        # The paper starts its sub-models from ImageNet-pretrained DeiT-Ti; here: a vit_pico trained on the same
        # training split (also the "one small model alone" baseline).
        print(f"sub-model init vit_pico, {small_epochs} epochs ...", flush=True)
        records["pico"] = train_teacher(small_dir, "vit_pico", small_epochs, lr=2e-3)
        atomic_write(work / "train.json", json.dumps(records, indent=2) + "\n")
    for key, n, extra in variants:
        print(f"DeViT {n} parts {extra or ''} ...", flush=True)
        res = train_devit(DevitConfig(teacher=str(teacher_dir), parts=n, out=str(work / key),
                                      student_weights=str(small_dir), **stage_epochs, **extra), force=True)
        records[key] = {"val_acc": res["val_acc"], "seconds": res["seconds"]}
    for name, rec in records.items():
        print(f"  {name}: held-out {rec['val_acc']:.2%} (trained in {rec['seconds']:.0f} s)", flush=True)

    # --- latency, all measured here, back to back ---------------------------------------------------------------------
    from effai import zoo

    teacher = zoo.create(weights=teacher_dir / "model.safetensors").model
    small = zoo.create(weights=small_dir / "model.safetensors").model
    card = zoo.card_from_checkpoint(teacher_dir / "model.safetensors")
    stream = load_stream("digits", tuple(card.input_size), list(card.mean), list(card.std), images, val_seed=0)
    rtt = gloo_round_trip_ms()
    print(f"gloo request + CLS-feature round trip between two processes on this host: {rtt:.2f} ms", flush=True)
    teacher_ms = median_latency(teacher, stream.x)
    small_ms = median_latency(small, stream.x)
    rows = [{"model": "teacher vit_tiny (1 device)", "devices": 1, "val_acc": records["teacher"]["val_acc"],
             "params_per_device": [_params(teacher)], "device_compute_ms": [teacher_ms], "end_to_end_ms": teacher_ms,
             "ideal_parallel_ms": teacher_ms, "latency_ratio": 1.0, "train_seconds": records["teacher"]["seconds"]},
            {"model": "vit_pico alone (1 device)", "devices": 1, "val_acc": records["pico"]["val_acc"],
             "params_per_device": [_params(small)], "device_compute_ms": [small_ms], "end_to_end_ms": small_ms,
             "ideal_parallel_ms": small_ms, "latency_ratio": teacher_ms / small_ms,
             "train_seconds": records["pico"]["seconds"]}]
    for key, n, extra in variants:
        run_dir = work / key
        name = f"DeViT {n} x vit_pico" + (f" pruned {neurons:g}/{heads:g}" if "prune_neurons" in extra else
                                          f", {extra['epochs']} DEKD epochs" if extra else "")
        decomp = load_run(run_dir)
        manifest = json.loads((run_dir / "devit.json").read_text())
        part_ms = [median_latency(p.model, stream.x) for p in decomp.parts]
        with torch.no_grad():
            feats = torch.cat([p.model(stream.x[:1]) for p in decomp.parts], 1)
        fusion_ms = median_latency(decomp.fusion.model, feats.expand(8, -1).contiguous())
        t_ms = median_latency(teacher, stream.x)          # the teacher again, right before the live run
        live = run_local(decomp, run_dir, RunSpec(data="digits", images=images, batch_size=1, warmup=5,
                                                  timeout_s=60), threads=1)
        r = live.report
        e2e, ideal = r["end_to_end_ms"]["median"], max(part_ms) + fusion_ms
        rows.append({"model": name, "devices": n, "val_acc": manifest["val_acc"],
                     "distributed_acc_on_streamed": r.get("accuracy"),
                     "params_per_device": [p["params"] for p in manifest["parts"]],
                     "fusion_params": manifest["fusion"]["params"], "device_compute_ms": part_ms,
                     "fusion_ms": fusion_ms, "teacher_ms_same_time": t_ms,
                     "device_compute_ms_in_run": [d["compute_ms"]["median"] for d in r["devices"]],
                     "end_to_end_ms": e2e, "end_to_end_p90_ms": r["end_to_end_ms"]["p90"],
                     "network_ms": r["network_ms"].get("median"), "ideal_parallel_ms": ideal,
                     "latency_ratio": t_ms / e2e, "ideal_latency_ratio": t_ms / ideal,
                     "bytes_per_image": r["feature_bytes_per_image"], "train_seconds": records[key]["seconds"],
                     "sub_teacher_val_acc": [p["sub_teacher_val_acc"] for p in manifest["parts"]],
                     "dekd_val_acc_on_subset": [p["dekd_val_acc"] for p in manifest["parts"]],
                     **({"pruning": [{k: p["pruning"][k] for k in ("heads", "mlp_neurons", "params_before",
                        "params_after", "val_acc_after_cut", "val_acc_recovered")} for p in manifest["parts"]]}
                        if "prune_neurons" in extra else {})})
        print(f"{name}: held-out {manifest['val_acc']:.2%}, e2e {e2e:.2f} ms (x{t_ms / e2e:.2f} vs teacher "
              f"{t_ms:.2f} ms), ideal {ideal:.2f} ms (x{t_ms / ideal:.2f})", flush=True)

    result = {"benchmark": "DeViT on digits: teacher ViT vs N-part decompositions", "quick": args.quick,
              "gloo_round_trip_ms": rtt,
              "host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "threads_per_process": 1},
              "input": f"1x{SIZE}x{SIZE}, patch 8", "teacher_epochs": teacher_epochs, "small_epochs": small_epochs,
              "devit_config": DevitConfig(teacher="-", **stage_epochs).to_dict(), "latency_images": images,
              "rows": rows, "seconds": round(time.perf_counter() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\n{'model':<40}{'acc':>8}{'params/device':>15}{'device ms':>11}{'e2e ms':>9}{'x teacher':>10}"
          f"{'ideal ms':>10}{'x ideal':>9}")
    for row in rows:
        print(f"{row['model']:<40}{row['val_acc']:>8.2%}{max(row['params_per_device']):>15,}"
              f"{max(row['device_compute_ms']):>11.2f}{row['end_to_end_ms']:>9.2f}{row['latency_ratio']:>10.2f}"
              f"{row['ideal_parallel_ms']:>10.2f}{row.get('ideal_latency_ratio', row['latency_ratio']):>9.2f}")
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


def _ints(csv: str) -> list[int]:
    return [int(v) for v in csv.split(",") if v.strip()]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
