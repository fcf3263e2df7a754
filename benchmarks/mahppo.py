"""MAHPPO on measured split-inference costs: ghostnetv3_050.digits split at its 5 stage exits (autoencoders of
`effai split-ae`, rate 4x4), every half exported to ONNX (`effai split`) and timed with `effai bench` on this host
(1 thread); the environment (effai/collab/env.py) takes those times; MAHPPO and the baselines (all-local,
all-offload, random, best fixed split by brute force over options x 5 power levels) are evaluated on the same 50
held-out channel episodes, over 3 seeds.

    effai split-ae ghostnetv3_050.digits --out runs/split_ae                      # ~10 min, 1 thread
    for p in blocks.0 blocks.2 blocks.4 blocks.6 blocks.9; do
      effai split ghostnetv3_050.digits --at $p --ae runs/split_ae --targets onnx --out effai_out/split/${p/./_}; done
    effai export ghostnetv3_050.digits --target onnx --out effai_out/split/whole-onnx
    effai bench effai_out/split/whole-onnx effai_out/split/*/onnx/{device,server} --threads 1 --runs 200 \
      --energy none --out benchmarks/results/split_bench_host.json
    python benchmarks/mahppo.py                  # ~3 min; --steps N --seeds 0,1,2 --devices 4

Writes benchmarks/results/split_profile_ghostnetv3_050_digits.json, benchmarks/results/mahppo.json and
docs/mahppo_curves.png. Simulated parts (said in docs/split.md): the channel, the power model (this host has no
meter) and the server (the host's times / 10); the device times are this host's measured ONNX Runtime times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POINTS = ("blocks.0", "blocks.2", "blocks.4", "blocks.6", "blocks.9")


def build_profile(bench: Path, ae_report: Path, split_root: Path) -> dict:
    """Options offload / each split point / local, from the bench report's medians and the autoencoder table."""
    recs = {}
    for r in json.loads(bench.read_text())["records"]:
        if r.get("status") == "ok" and r["threads"] == 1:
            recs[str(Path(r["artifact"]["path"]).resolve())] = r["stats"]["median"]
    ae = json.loads(ae_report.read_text())
    rows = {r["point"]: r for r in ae["rows"] if (r["reduction"], r["bits"]) == (4, 4)}

    def ms(p: Path) -> float:
        key = str(p.resolve())
        if key not in recs:
            raise SystemExit(f"{p} was not benchmarked in {bench}; run the effai bench line of this script's doc")
        return recs[key]

    whole = ms(split_root / "whole-onnx")
    opts, dev, srv, nbytes, top1 = ["offload"], [0.0], [whole], [int(ae["input_bytes_u8"])], [ae["val_top1_model"]]
    for p in POINTS:
        d = split_root / p.replace(".", "_")
        rec = json.loads((d / "split.json").read_text())
        if rec["autoencoder"] is None or rec["autoencoder"]["bits"] != 4:
            raise SystemExit(f"{d} was exported without the 4x4 autoencoder; re-export it with --ae")
        opts.append(p)
        dev.append(ms(d / "onnx" / "device"))
        srv.append(ms(d / "onnx" / "server"))
        nbytes.append(int(rec["bytes_per_image"]))
        top1.append(rows[p]["val_top1"])
    opts.append("local"); dev.append(whole); srv.append(0.0); nbytes.append(0); top1.append(ae["val_top1_model"])
    return {"options": opts, "device_ms": dev, "server_ms": srv, "bytes": nbytes, "top1": top1,
            "source": f"effai bench {bench.name} (host, onnxruntime, 1 thread, medians); {ae_report.name}"}


def evaluate(env_fn, policy, episodes: int, seed0: int = 10_000) -> dict:
    env = env_fn()
    lat, en, rew, opt_counts = [], [], [], np.zeros(env.n_options, dtype=int)
    for e in range(episodes):
        obs, _ = env.reset(seed=seed0 + e)
        while env.agents:
            obs, r, _t, _tr, _ = env.step(policy(env, obs))
            c = env.last
            lat.extend(c.latency_s.tolist()); en.extend(c.energy_j.tolist()); rew.append(next(iter(r.values())))
            np.add.at(opt_counts, c.options, 1)
    return {"latency_ms": 1e3 * float(np.mean(lat)), "energy_mj": 1e3 * float(np.mean(en)),
            "reward": float(np.mean(rew)), "option_share": (opt_counts / opt_counts.sum()).round(3).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", type=Path, default=RESULTS / "split_bench_host.json")
    ap.add_argument("--ae", type=Path, default=ROOT / "runs" / "split_ae" / "split_ae.json")
    ap.add_argument("--split-root", type=Path, default=ROOT / "effai_out" / "split")
    ap.add_argument("--profile", type=Path, default=None, help="use this profile JSON instead of building one")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128 * 24)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--episodes", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from effai.collab.env import EnvConfig, SplitInferenceEnv, SplitProfile
    from effai.rl.mahppo import MAHPPO, PPOConfig

    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.profile:
        prof_d = json.loads(args.profile.read_text())
    else:
        prof_d = build_profile(args.bench, args.ae, args.split_root)
        (RESULTS / "split_profile_ghostnetv3_050_digits.json").write_text(json.dumps(prof_d, indent=2) + "\n")
    profile = SplitProfile.from_dict(prof_d)
    cfg = EnvConfig(n_devices=args.devices)
    env_fn = lambda: SplitInferenceEnv(profile, cfg)  # noqa: E731
    n_opt, local = len(profile.options), len(profile.options) - 1

    def fixed(k: int, u: float):
        return lambda env, obs: {a: (k, np.array([u], np.float32)) for a in env.possible_agents}

    base = {"all-local": evaluate(env_fn, fixed(local, -1.0), args.episodes),
            "all-offload (max power)": evaluate(env_fn, fixed(0, 1.0), args.episodes)}
    best, best_key = None, None
    brute = {}
    for k, u in itertools.product(range(n_opt), (-1.0, -0.5, 0.0, 0.5, 1.0)):
        r = evaluate(env_fn, fixed(k, u), args.episodes)
        brute[f"{profile.options[k]}@{u:+.1f}"] = r["reward"]
        if best is None or r["reward"] > best["reward"]:
            best, best_key = r, (profile.options[k], u)
    base[f"best fixed ({best_key[0]}, power {cfg.p_min_w + (best_key[1] + 1) / 2 * (cfg.p_max_w - cfg.p_min_w):.3f} W)"] = best
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for s in seeds:
        rng = np.random.default_rng(s)
        rnd = evaluate(env_fn, lambda env, obs: {a: (int(rng.integers(env.n_options)),
                                                     rng.uniform(-1, 1, 1).astype(np.float32))
                                                 for a in env.possible_agents}, args.episodes)
        t0 = time.perf_counter()
        agent = MAHPPO.for_env(env_fn(), PPOConfig(seed=s))
        logs = agent.train(env_fn(), args.steps, seed=s)
        secs = time.perf_counter() - t0
        ev = evaluate(env_fn, agent.policy(deterministic=True), args.episodes)
        runs.append({"seed": s, "train_seconds": round(secs, 1), "mahppo": ev, "random": rnd,
                     "curve": [{"step": l["step"], "reward": l["reward"]} for l in logs]})
        print(f"seed {s}: MAHPPO reward {ev['reward']:.4f} latency {ev['latency_ms']:.3f} ms energy "
              f"{ev['energy_mj']:.3f} mJ ({secs:.0f} s); random {rnd['reward']:.4f}", flush=True)

    loc = base["all-local"]
    def red(r: dict) -> dict:
        return {"latency_reduction": 1 - r["latency_ms"] / loc["latency_ms"],
                "energy_reduction": 1 - r["energy_mj"] / loc["energy_mj"]}

    m = {k: [r["mahppo"][k] for r in runs] for k in ("latency_ms", "energy_mj", "reward")}
    rnd = {k: [r["random"][k] for r in runs] for k in ("latency_ms", "energy_mj", "reward")}
    table = {name: {**r, **red(r)} for name, r in base.items()}
    table["random (mean of seeds)"] = {k: float(np.mean(v)) for k, v in rnd.items()}
    table["random (mean of seeds)"].update(red(table["random (mean of seeds)"]))
    table["MAHPPO (mean of seeds)"] = {k: float(np.mean(v)) for k, v in m.items()}
    table["MAHPPO (mean of seeds)"].update({f"{k}_std": float(np.std(v)) for k, v in m.items()})
    table["MAHPPO (mean of seeds)"].update(red(table["MAHPPO (mean of seeds)"]))
    out = {"profile": prof_d, "env": {k: v for k, v in cfg.__dict__.items()}, "steps": args.steps,
           "episodes": args.episodes, "seeds": seeds, "table": table, "brute_force_rewards": brute, "runs": runs,
           "host": "2-core CPU host (shared), onnxruntime 1 thread"}
    (RESULTS / "mahppo.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, r in table.items():
        print(f"{name:<48} latency {r['latency_ms']:7.3f} ms ({r['latency_reduction']:+.1%})  energy "
              f"{r['energy_mj']:7.3f} mJ ({r['energy_reduction']:+.1%})  reward {r['reward']:.4f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot([c["step"] for c in r["curve"]], [c["reward"] for c in r["curve"]], label=f"MAHPPO seed {r['seed']}")
    for name, style in (("all-local", "k--"), ("all-offload (max power)", "r:")):
        ax.axhline(table[name]["reward"], color=style[0], ls=style[1:], label=name)
    bname = next(k for k in table if k.startswith("best fixed"))
    ax.axhline(table[bname]["reward"], color="g", ls="-.", label=bname)
    ax.axhline(table["random (mean of seeds)"]["reward"], color="gray", ls=":", label="random")
    ax.set_xlabel("environment rounds"); ax.set_ylabel("team reward (rollout mean)")
    ax.set_title(f"MAHPPO, {args.devices} devices, ghostnetv3_050.digits split costs (host-measured)")
    ax.legend(fontsize=7); fig.tight_layout()
    fig.savefig(ROOT / "docs" / "mahppo_curves.png", dpi=110)


if __name__ == "__main__":
    main()
