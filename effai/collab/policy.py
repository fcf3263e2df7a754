"""Train and save a MAHPPO policy for a set of split exports: the environment's per-option costs are measured from
the artifacts themselves (device and server half medians in their runtime on this host, code bytes and held-out
top-1 from split.json, the whole model's time from --local), or read from a profile JSON (benchmarks/mahppo.py
writes one). `effai collab train-policy`; docs/split.md, "Live run".
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effai.errors import UsageError


def _median_ms(pred: Any, x: np.ndarray, runs: int) -> float:
    pred.run([x])                                  # warm-up
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        pred.run([x])
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def profile_from_exports(split_dirs: list[Path], target: str, local_dir: Path, runs: int = 50) -> dict[str, Any]:
    """Options = each export's split point (in the model's chain order) + "local" (the reference the reward
    divides by); times are this host's medians over `runs` single-image runs in the target's runtime."""
    from effai.collab.live import _load, _records

    recs = _records(list(split_dirs), target)
    order = next(iter(recs.values()))[1].get("points", [])
    points = sorted(recs, key=lambda p: order.index(p) if p in order else len(order))
    whole, m = _load(Path(local_dir))
    shape = tuple(m["inputs"][0]["shape"]) if m.get("inputs") else None
    dev0 = _load(recs[points[0]][0] / target / "device")[0]
    in_shape = tuple(recs[points[0]][1]["targets"][target]["device"]["input_shape"])
    if shape is not None and tuple(shape) != in_shape:
        raise UsageError(f"--local {local_dir} takes input {list(shape)}, the device halves {list(in_shape)}; export "
                         "the same model for --local")
    x = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    opts, dev, srv, nbytes, top1 = [], [], [], [], []
    for p in points:
        d, rec = recs[p]
        device = dev0 if p == points[0] else _load(d / target / "device")[0]
        server = _load(d / target / "server")[0]
        code = np.asarray(device.run([x])[0], np.float32)
        opts.append(p)
        dev.append(_median_ms(device, x, runs))
        srv.append(_median_ms(server, code.reshape(rec["targets"][target]["server"]["input_shape"]), runs))
        nbytes.append(int(rec["bytes_per_image"]))
        top1.append(float(rec["autoencoder"]["val_top1"]))
    whole_ms = _median_ms(whole, x, runs)
    opts.append("local"); dev.append(whole_ms); srv.append(0.0); nbytes.append(0)
    top1.append(float(next(iter(recs.values()))[1]["autoencoder"].get("val_top1_model", max(top1))))
    return {"options": opts, "device_ms": dev, "server_ms": srv, "bytes": nbytes, "top1": top1,
            "source": f"measured by effai collab train-policy on this host ({target}, {runs} runs, medians)"}


def train_policy(profile: dict[str, Any], out: Path, devices: int = 4, steps: int = 128 * 24, seed: int = 0,
                 server_speedup: float = 10.0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train MAHPPO on the environment built from `profile`, compare with all-local and the best fixed option on 20
    held-out channel episodes, save the policy (safetensors) to `out`."""
    import torch

    from effai.collab.env import EnvConfig, SplitInferenceEnv, SplitProfile
    from effai.rl.mahppo import MAHPPO, PPOConfig

    if devices < 1 or steps < 1:
        raise UsageError(f"--devices {devices} and --steps {steps} must be >= 1")
    prof = SplitProfile.from_dict(profile)
    if prof.options[-1] != "local":
        raise UsageError(f"the profile's last option is {prof.options[-1]!r}; it must be 'local' (the reference)")
    cfg = EnvConfig(n_devices=devices, server_speedup=server_speedup)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        agent = MAHPPO.for_env(SplitInferenceEnv(prof, cfg), PPOConfig(seed=seed))
        t0 = time.perf_counter()
        logs = agent.train(SplitInferenceEnv(prof, cfg), steps, seed=seed,
                           on_update=(lambda i, l: progress(f"update {i}: step {l['step']}, reward "
                                                            f"{l['reward']:.4f}")) if progress else None)
        secs = time.perf_counter() - t0
        agent.save(out)
        env = SplitInferenceEnv(prof, cfg)

        def reward(pick: Callable[[Any, dict], dict]) -> float:
            rs = []
            for e in range(20):
                obs, _ = env.reset(seed=10_000 + e)
                while env.agents:
                    obs, r, *_ = env.step(pick(env, obs))
                    rs.append(next(iter(r.values())))
            return float(np.mean(rs))

        def fixed(k: int, u: float) -> Callable[[Any, dict], dict]:
            return lambda env, obs: {a: (k, np.array([u], np.float32)) for a in env.possible_agents}

        best = max(((prof.options[k], u, reward(fixed(k, u))) for k in range(len(prof.options))
                    for u in (-1.0, 0.0, 1.0)), key=lambda t: t[2])
        return {"out": str(out), "options": list(prof.options), "devices": devices, "steps": steps,
                "train_seconds": round(secs, 1), "reward_first_rollout": logs[0]["reward"],
                "reward_mahppo": reward(agent.policy()), "reward_all_local": reward(fixed(len(prof.options) - 1, -1)),
                "best_fixed": {"option": best[0], "u": best[1], "reward": best[2]}}
    finally:
        torch.set_num_threads(n_threads)
