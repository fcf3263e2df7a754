"""MAHPPO's multi-device split-inference environment: N user devices and one edge server; each step every device
picks a split option (discrete: offload, a split point, local) and a transmit power (continuous). PettingZoo
ParallelEnv (+ `JointGymEnv`, a Gymnasium single-agent wrapper). Latency, energy and channel model: docs/split.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from effai.errors import UsageError


@dataclass(frozen=True)
class SplitProfile:
    """Per split option (0 = offload the raw input, 1..K = split points with their autoencoders, K+1 = local):
    device compute, server compute (both ms, measured), bytes sent, held-out top-1."""

    options: tuple[str, ...]
    device_ms: tuple[float, ...]
    server_ms: tuple[float, ...]
    bytes: tuple[int, ...]
    top1: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.options)
        if n < 2 or any(len(v) != n for v in (self.device_ms, self.server_ms, self.bytes, self.top1)):
            raise UsageError(f"split profile needs >= 2 options and one value per option in every field ({n} "
                             "options); rebuild it with benchmarks/mahppo.py")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitProfile:
        try:
            return cls(tuple(map(str, d["options"])), tuple(map(float, d["device_ms"])),
                       tuple(map(float, d["server_ms"])), tuple(map(int, d["bytes"])), tuple(map(float, d["top1"])),
                       str(d.get("source", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"split profile is malformed ({type(e).__name__}: {e}); rebuild it with "
                             "benchmarks/mahppo.py") from None


@dataclass(frozen=True)
class EnvConfig:
    """The system model. Defaults: a 1 MHz uplink shared by the transmitting devices (FDMA), devices 100-500 m
    from the server, path loss exponent 3.8 with Rayleigh fading, noise -174 dBm/Hz, 0.01-1 W transmit power, 2 W
    device compute power (an assumed phone SoC active power: this host has no power meter), a server S = 10x faster
    than the device's measured times, shared by the devices that use it (processor sharing)."""

    n_devices: int = 4
    episode_steps: int = 16
    bandwidth_hz: float = 1e6
    noise_dbm_hz: float = -174.0
    path_loss_exp: float = 3.8
    dist_m: tuple[float, float] = (100.0, 500.0)
    p_min_w: float = 0.01
    p_max_w: float = 1.0
    device_power_w: float = 2.0
    server_speedup: float = 10.0
    w_latency: float = 0.5                 # reward = -(w_t * T / T_local + (1 - w_t) * E / E_local), team mean
    min_top1: float = 0.0                  # options whose held-out top-1 is below this are penalised
    seed: int | None = None


@dataclass
class StepCost:
    latency_s: np.ndarray                  # per device
    energy_j: np.ndarray
    tx_s: np.ndarray
    options: np.ndarray
    power_w: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def system_cost(profile: SplitProfile, cfg: EnvConfig, gains: np.ndarray, options: np.ndarray,
                power_w: np.ndarray) -> StepCost:
    """Latency and device energy of one round (every device infers one image).
        T_i = t_dev(k_i) + b(k_i) * 8 / R_i + t_srv(k_i) * n_srv / S
        R_i = (B / n_tx) log2(1 + p_i g_i / (N_0 B / n_tx))            (Shannon rate, bandwidth split evenly)
        E_i = P_dev t_dev(k_i) + p_i b(k_i) * 8 / R_i
    n_tx: devices sending bytes this round; n_srv: devices using the server this round."""
    k = np.asarray(options, dtype=int)
    p = np.clip(np.asarray(power_w, dtype=float), cfg.p_min_w, cfg.p_max_w)
    dev = np.array(profile.device_ms)[k] / 1e3
    srv = np.array(profile.server_ms)[k] / 1e3
    bits = np.array(profile.bytes, dtype=float)[k] * 8
    sending = bits > 0
    n_tx = max(1, int(sending.sum()))
    n_srv = max(1, int((srv > 0).sum()))
    b = cfg.bandwidth_hz / n_tx
    noise_w = 10 ** ((cfg.noise_dbm_hz - 30) / 10) * b
    rate = b * np.log2(1 + p * gains / noise_w)
    tx = np.where(sending, bits / np.maximum(rate, 1e-9), 0.0)
    latency = dev + tx + srv * n_srv / cfg.server_speedup
    energy = cfg.device_power_w * dev + np.where(sending, p, 0.0) * tx
    return StepCost(latency, energy, tx, k, np.where(sending, p, 0.0))


def _parallel_base() -> type:
    from pettingzoo import ParallelEnv

    return ParallelEnv


class SplitInferenceEnv(_parallel_base()):  # type: ignore[misc]
    """PettingZoo ParallelEnv. Agent i observes [its own channel gain (dB, scaled), the mean gain of the others,
    the round in the episode]; action = (option index, power in [-1, 1] mapped linearly onto [p_min, p_max]);
    every agent receives the team reward. `state()` is every gain (for a centralised critic)."""

    metadata = {"name": "effai_split_inference_v0", "render_modes": []}
    OBS_LAYOUT = "own_gain_db_scaled,others_mean_gain_db_scaled,round_fraction"   # see gain_obs(); a saved policy
                                                                                 # records it

    def __init__(self, profile: SplitProfile, cfg: EnvConfig = EnvConfig()) -> None:
        if cfg.n_devices < 1:
            raise UsageError(f"n_devices={cfg.n_devices}: choose 1 or more")
        self.profile, self.cfg = profile, cfg
        self.possible_agents = [f"device_{i}" for i in range(cfg.n_devices)]
        self.agents: list[str] = []
        self.rng = np.random.default_rng(cfg.seed)
        self.t = 0
        self.gains = np.ones(cfg.n_devices)
        self.dist = np.ones(cfg.n_devices)
        local = len(profile.options) - 1
        self._local = system_cost(profile, cfg, np.ones(cfg.n_devices), np.full(cfg.n_devices, local),
                                  np.full(cfg.n_devices, cfg.p_min_w))
        self.last: StepCost | None = None

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> Any:
        from gymnasium import spaces

        return spaces.Box(-10.0, 10.0, shape=(3,), dtype=np.float32)

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> Any:
        from gymnasium import spaces

        return spaces.Tuple((spaces.Discrete(len(self.profile.options)),
                             spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)))

    @property
    def n_options(self) -> int:
        return len(self.profile.options)

    def _gain_db(self) -> np.ndarray:
        return 10 * np.log10(self.gains)

    def _draw(self) -> None:
        """Rayleigh block fading each round on top of the episode's distance path loss: g = d^-alpha |h|^2."""
        h2 = self.rng.exponential(1.0, self.cfg.n_devices)
        self.gains = self.dist ** (-self.cfg.path_loss_exp) * h2

    def _obs(self) -> dict[str, np.ndarray]:
        g = gain_obs(self._gain_db())
        out = {}
        for i, a in enumerate(self.possible_agents):
            others = np.delete(g, i).mean() if len(g) > 1 else 0.0
            out[a] = np.clip(np.array([g[i], others, self.t / self.cfg.episode_steps], dtype=np.float32), -10, 10)
        return out

    def state(self) -> np.ndarray:
        g = gain_obs(self._gain_db())
        return np.clip(np.concatenate([g, [self.t / self.cfg.episode_steps]]), -10, 10).astype(np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t = 0
        lo, hi = self.cfg.dist_m
        self.dist = self.rng.uniform(lo, hi, self.cfg.n_devices)
        self._draw()
        return self._obs(), {a: {} for a in self.agents}

    def power(self, u: np.ndarray) -> np.ndarray:
        u = np.clip(np.asarray(u, dtype=float), -1.0, 1.0)
        return self.cfg.p_min_w + (u + 1) / 2 * (self.cfg.p_max_w - self.cfg.p_min_w)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise UsageError(f"actions are missing for {', '.join(missing)}; the env has {len(self.agents)} devices "
                             "(a policy trained for another number of devices does not fit)")
        ks = np.array([int(actions[a][0]) for a in self.possible_agents])
        if ks.min() < 0 or ks.max() >= self.n_options:
            raise UsageError(f"split option out of range 0..{self.n_options - 1} ({', '.join(self.profile.options)})")
        us = np.array([float(np.asarray(actions[a][1]).reshape(-1)[0]) for a in self.possible_agents])
        cost = system_cost(self.profile, self.cfg, self.gains, ks, self.power(us))
        self.last = cost
        rew = float(self.reward(cost))
        self.t += 1
        done = self.t >= self.cfg.episode_steps
        infos = {a: {"latency_s": float(cost.latency_s[i]), "energy_j": float(cost.energy_j[i]),
                     "option": self.profile.options[ks[i]]} for i, a in enumerate(self.possible_agents)}
        rewards = {a: rew for a in self.agents}
        terms = {a: done for a in self.agents}
        truncs = {a: False for a in self.agents}
        if not done:
            self._draw()
        obs = self._obs()
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    def reward(self, cost: StepCost) -> float:
        """Team reward: -(w T/T_local + (1-w) E/E_local), mean over devices, minus 1 per device on an option
        whose top-1 is under min_top1."""
        w = self.cfg.w_latency
        r = -(w * cost.latency_s / self._local.latency_s + (1 - w) * cost.energy_j / self._local.energy_j)
        acc = np.array(self.profile.top1)[cost.options]
        r = r - (acc < self.cfg.min_top1).astype(float)
        return float(r.mean())

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def _gym_base() -> type:
    import gymnasium

    return gymnasium.Env


class JointGymEnv(_gym_base()):  # type: ignore[misc]
    """Gymnasium single-agent view: one controller picks every device's option and power. Observation = the
    global state; action = (MultiDiscrete options, Box powers in [-1, 1]); reward = the team reward."""

    metadata = {"render_modes": []}

    def __init__(self, profile: SplitProfile, cfg: EnvConfig = EnvConfig()) -> None:
        from gymnasium import spaces

        self.env = SplitInferenceEnv(profile, cfg)
        n = cfg.n_devices
        self.observation_space = spaces.Box(-10.0, 10.0, shape=(n + 1,), dtype=np.float32)
        self.action_space = spaces.Tuple((spaces.MultiDiscrete([len(profile.options)] * n),
                                          spaces.Box(-1.0, 1.0, shape=(n,), dtype=np.float32)))

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.env.reset(seed=seed)
        return self.env.state(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        ks, us = action
        acts = {a: (int(ks[i]), np.array([us[i]], dtype=np.float32)) for i, a in enumerate(self.env.possible_agents)}
        _obs, rew, term, _trunc, infos = self.env.step(acts)
        done = all(term.values())
        state = self.env.state()
        return state, float(next(iter(rew.values()))), done, False, {"devices": infos}


def local_cost(profile: SplitProfile, cfg: EnvConfig) -> tuple[float, float]:
    """(latency s, energy J) of one device running the whole model locally (the all-local reference)."""
    c = system_cost(profile, cfg, np.ones(1), np.array([len(profile.options) - 1]), np.array([cfg.p_min_w]))
    return float(c.latency_s[0]), float(c.energy_j[0])


def shannon_rate(bandwidth_hz: float, power_w: float, gain: float, noise_dbm_hz: float) -> float:
    """R = B log2(1 + p g / (N0 B)), bits/s (a helper for docs and tests)."""
    return bandwidth_hz * math.log2(1 + power_w * gain / (10 ** ((noise_dbm_hz - 30) / 10) * bandwidth_hz))


def gain_obs(gain_db: np.ndarray | float) -> np.ndarray:
    """The observation's gain feature: -95 dB (~300 m at alpha 3.8) -> 0, 10 dB per unit."""
    return (np.asarray(gain_db, dtype=float) + 95.0) / 10.0


def gain_from_rate(rate_bps: float, power_w: float, bandwidth_hz: float, noise_dbm_hz: float) -> float:
    """Inverse of `shannon_rate`: the channel gain g at which a link of `bandwidth_hz` sending at `power_w` carries
    `rate_bps` (what the live run derives from a measured throughput to build the policy's observation)."""
    noise_w = 10 ** ((noise_dbm_hz - 30) / 10) * bandwidth_hz
    x = min(rate_bps / bandwidth_hz, 1000.0)
    return float((2.0 ** x - 1.0) * noise_w / max(power_w, 1e-12))
