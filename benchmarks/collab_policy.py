"""The live split run driven by a trained MAHPPO policy, and the int8 device halves, on this host.

    effai split-ae ghostnetv3_050.digits --out runs/split_ae --points blocks.4,blocks.6,blocks.9 --rates 4x4
    for p in blocks.4 blocks.6 blocks.9; do
      effai split ghostnetv3_050.digits --at $p --ae runs/split_ae --targets onnx --out effai_out/split/${p/./_}
      effai split ghostnetv3_050.digits --at $p --ae runs/split_ae --targets onnx --device-precision int8 \
        --out effai_out/split/${p/./_}-int8; done
    effai export ghostnetv3_050.digits --target onnx --out effai_out/split/whole-onnx
    python benchmarks/collab_policy.py            # --images 200 --runs 300 --steps 3072

1. Device half fp32 vs int8 (ONNX Runtime, 1 thread, `--runs` single-image runs, the two interleaved), median ms and
   ratio, with each int8 export's held-out top-1 drop (from its split.json).
2. `effai collab train-policy` on the fp32 exports (profile timed here, 1 device, server speedup 1: the server is
   this same host), saved as runs/collab_policy.safetensors.
3. `effai collab serve` (a separate process) hosting blocks.4/6/9; this process runs the device with --policy and
   --local, then each fixed split, `--images` held-out digits each; end-to-end medians vs all-local of the same run.
Writes benchmarks/results/collab_policy_host.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT / "effai_out" / "split"
POINTS = ("blocks.4", "blocks.6", "blocks.9")


def device_halves(runs: int) -> list[dict]:
    from effai.collab.live import _load

    rows = []
    x = np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32)
    for p in POINTS:
        d = SPLIT / p.replace(".", "_")
        fp32, q = _load(d / "onnx" / "device")[0], _load(Path(f"{d}-int8") / "onnx" / "device")[0]
        t = {"fp32": [], "int8": []}
        for pred in (fp32, q):
            for _ in range(20):
                pred.run([x])
        for _ in range(runs):
            for k, pred in (("fp32", fp32), ("int8", q)):
                t0 = time.perf_counter()
                pred.run([x])
                t[k].append((time.perf_counter() - t0) * 1e3)
        rec = json.loads((Path(f"{d}-int8") / "split.json").read_text())
        ev = rec["targets"]["onnx"]["composed"]["eval"]
        m32, m8 = statistics.median(t["fp32"]), statistics.median(t["int8"])
        rows.append({"point": p, "fp32_ms": m32, "int8_ms": m8, "speedup": m32 / m8, "top1_fp32_split":
                     ev["top1_torch_split_fp32"], "top1_int8_device": ev["top1"], "drop_points": ev["drop_points"]})
        print(f"{p}: device half fp32 {m32:.3f} ms, int8 {m8:.3f} ms ({m32 / m8:.2f}x); held-out top-1 "
              f"{ev['top1']:.2%} (drop {ev['drop_points']:.2f} points)", flush=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--steps", type=int, default=128 * 24)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from effai.collab.live import run
    from effai.collab.policy import profile_from_exports, train_policy

    out = {"host": "shared 2-core CPU host, onnxruntime CPU, 1 thread", "load_avg_start": os.getloadavg()}
    out["device_halves"] = device_halves(args.runs)
    dirs = [SPLIT / p.replace(".", "_") for p in POINTS]
    whole = SPLIT / "whole-onnx"
    prof = profile_from_exports(dirs, "onnx", whole, runs=100)
    pol = ROOT / "runs" / "collab_policy.safetensors"
    out["policy_training"] = train_policy(prof, pol, devices=1, steps=args.steps, seed=0, server_speedup=1.0)
    out["profile"] = prof
    print("policy:", json.dumps({k: v for k, v in out["policy_training"].items() if k != "options"}), flush=True)
    token = "b" * 40
    env = {**os.environ, "EFFAI_DEVIT_TOKEN": token, "OMP_NUM_THREADS": "1"}
    live = []
    for mode in ["policy", *POINTS]:
        port = free_port()
        srv = subprocess.Popen([sys.executable, "-m", "effai", "collab", "serve", *map(str, dirs), "--port", str(port),
                                "--wait", "60", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=ROOT)
        try:
            while True:   # the server prints "serving ..." on stderr once it listens (no probe connection)
                line = srv.stderr.readline()
                if not line or b"serving" in line:
                    break
            ds = dirs if mode == "policy" else [SPLIT / mode.replace(".", "_")]
            res = run(ds, "onnx", "127.0.0.1", port, token, args.images, 60.0, whole,
                      pol if mode == "policy" else None)
        finally:
            so, se = srv.communicate(timeout=60)
        res.pop("choices", None)
        res["mode"] = mode
        res["server"] = (json.loads(so.decode().strip().splitlines()[-1]) if so.strip()
                         else {"stderr": se.decode()[-300:]})
        live.append(res)
        print(f"{mode:<9} e2e {res['e2e_ms_median']:.3f} ms vs all-local {res['local_ms_median']:.3f} ms "
              f"({res['local_ms_median'] / res['e2e_ms_median']:.2f}x), top-1 {res['top1']:.2%}, "
              f"{res.get('split_share', '')}", flush=True)
    out["live"] = live
    out["load_avg_end"] = os.getloadavg()
    dest = ROOT / "benchmarks" / "results" / "collab_policy_host.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print("->", dest)


if __name__ == "__main__":
    main()
