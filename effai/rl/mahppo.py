"""MAHPPO: multi-agent PPO with a hybrid action space (a categorical head and a Gaussian head per agent) and a
centralised critic, for any PettingZoo ParallelEnv whose action spaces are Tuple(Discrete, Box) and that has
`state()`. Method and formulas in `MAHPPO`'s docstring; measurements: docs/split.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal

from effai.errors import UsageError

FORMAT = "effai.mahppo/1"    # safetensors metadata "format" of a saved policy


@dataclass(frozen=True)
class PPOConfig:
    rollout_steps: int = 128            # env rounds per update (every agent acts in each)
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip: float = 0.2
    lr_actor: float = 3e-3
    lr_critic: float = 3e-3
    entropy_discrete: float = 0.01
    entropy_continuous: float = 0.001
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    init_log_std: float = -0.5
    seed: int = 0


class Actor(nn.Module):
    """One agent's policy: a shared MLP trunk, logits over the discrete options, the mean of a tanh-squashed
    Gaussian for the continuous action (a state-independent learned log std)."""

    def __init__(self, obs_dim: int, n_discrete: int, n_continuous: int, hidden: int, init_log_std: float) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.logits = nn.Linear(hidden, n_discrete)
        self.mu = nn.Linear(hidden, n_continuous)
        self.log_std = nn.Parameter(torch.full((n_continuous,), init_log_std))
        for m in (self.logits, self.mu):
            nn.init.orthogonal_(m.weight, 0.01)
            nn.init.zeros_(m.bias)

    def dists(self, obs: torch.Tensor) -> tuple[Categorical, Normal]:
        h = self.trunk(obs)
        return Categorical(logits=self.logits(h)), Normal(torch.tanh(self.mu(h)), self.log_std.exp().expand_as(
            self.mu.bias).expand(obs.shape[0], -1))


class MAHPPO:
    """Multi-agent hybrid-action PPO (MAHPPO; Hao et al., IEEE TMC 2022, after Schulman et al. 2017's PPO).
    Each agent i has its own actor pi_i(k, u | o_i) = Cat(k | o_i) * N(u | mu(o_i), sigma) (the two heads are
    independent given o_i, so log pi = log Cat + log N); one critic V(s) sees the global state (centralised
    training, decentralised execution). Per agent, with r_t = pi_new / pi_old and team advantages
        A_t = sum_l (gamma lambda)^l delta_{t+l},  delta_t = R_t + gamma V(s_{t+1}) - V(s_t)      (GAE)
        L = -E[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)] - c_d H(Cat) - c_c H(N) + c_v (V(s_t) - G_t)^2
    The environment clips the sampled continuous action to [-1, 1]; the log-likelihood is of the unclipped
    sample (the usual PPO practice)."""

    def __init__(self, obs_dim: int, state_dim: int, n_agents: int, n_discrete: int, n_continuous: int = 1,
                 cfg: PPOConfig = PPOConfig()) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.n_agents = cfg, n_agents
        self.n_discrete, self.n_continuous = n_discrete, n_continuous
        self.actors = nn.ModuleList(Actor(obs_dim, n_discrete, n_continuous, cfg.hidden, cfg.init_log_std)
                                    for _ in range(n_agents))
        self.critic = nn.Sequential(nn.Linear(state_dim, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden),
                                    nn.Tanh(), nn.Linear(cfg.hidden, 1))
        self.opt_actor = torch.optim.Adam(self.actors.parameters(), lr=cfg.lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.obs_dim, self.state_dim = obs_dim, state_dim
        self.env_info: dict[str, Any] = {}   # what the policy was trained on: env name, options, obs layout

    @staticmethod
    def describe_env(env: Any) -> dict[str, Any]:
        """The environment facts a saved policy must match: name, option names, observation layout."""
        from dataclasses import is_dataclass

        profile, cfg = getattr(env, "profile", None), getattr(env, "cfg", None)
        return {"env": str(getattr(env, "metadata", {}).get("name", type(env).__name__)),
                "options": list(profile.options) if profile is not None else [],
                "obs_layout": str(getattr(env, "OBS_LAYOUT", "")),
                "config": asdict(cfg) if is_dataclass(cfg) else {},
                "profile": asdict(profile) if is_dataclass(profile) else {}}

    @classmethod
    def for_env(cls, env: Any, cfg: PPOConfig = PPOConfig()) -> MAHPPO:
        a0 = env.possible_agents[0]
        space = env.action_space(a0)
        agent = cls(int(np.prod(env.observation_space(a0).shape)), int(np.prod(env.state().shape)),
                    len(env.possible_agents), int(space[0].n), int(np.prod(space[1].shape)), cfg)
        agent.env_info = cls.describe_env(env)
        return agent

    def check_env(self, env: Any) -> None:
        n = len(env.possible_agents)
        if n != self.n_agents:
            raise UsageError(f"the policy was trained for {self.n_agents} devices but the environment has {n}; "
                             "train a policy for this number of devices")
        if not self.env_info:
            return
        got = self.describe_env(env)
        a0 = env.possible_agents[0]
        obs_dim = int(np.prod(env.observation_space(a0).shape))
        for key, mine, theirs in (("environment", self.env_info.get("env"), got["env"]),
                                  ("options", self.env_info.get("options"), got["options"]),
                                  ("observation layout", self.env_info.get("obs_layout"), got["obs_layout"]),
                                  ("observation size", self.obs_dim, obs_dim)):
            if mine != theirs:
                raise UsageError(f"the policy was trained for another {key} ({mine} vs this environment's {theirs});"
                                 " train a policy for this environment (effai collab train-policy)")

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """obs: n_agents x obs_dim -> (options, continuous actions, joint log-probs) per agent."""
        o = torch.as_tensor(obs, dtype=torch.float32)
        ks, us, lps = [], [], []
        for i, actor in enumerate(self.actors):
            cat, gauss = actor.dists(o[i:i + 1])
            if deterministic:
                k, u = cat.probs.argmax(-1), gauss.mean
            else:
                k = torch.multinomial(cat.probs, 1, generator=self.gen).squeeze(-1)
                u = gauss.mean + gauss.stddev * torch.randn(gauss.mean.shape, generator=self.gen)
            ks.append(int(k))
            us.append(u[0].numpy())
            lps.append(float(cat.log_prob(k) + gauss.log_prob(u).sum(-1)))
        return np.array(ks), np.stack(us), np.array(lps)

    def policy(self, deterministic: bool = True) -> Callable[[Any, dict], dict]:
        """A callable (env, obs dict) -> action dict for evaluation."""
        def pick(env: Any, obs: dict) -> dict:
            o = np.stack([obs[a] for a in env.possible_agents])
            ks, us, _ = self.act(o, deterministic)
            return {a: (int(ks[i]), np.clip(us[i], -1, 1).astype(np.float32))
                    for i, a in enumerate(env.possible_agents)}
        return pick

    def train(self, env: Any, total_steps: int, seed: int = 0,
              on_update: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Collect `rollout_steps` rounds, update, repeat until `total_steps` rounds; returns one log per update."""
        self.check_env(env)
        cfg = self.cfg
        obs, _ = env.reset(seed=seed)
        ep = 0
        logs: list[dict[str, float]] = []
        done_steps = 0
        while done_steps < total_steps:
            O, S, K, U, LP, R, D, V = [], [], [], [], [], [], [], []
            for _ in range(cfg.rollout_steps):
                o = np.stack([obs[a] for a in env.possible_agents]).astype(np.float32)
                s = env.state()
                ks, us, lps = self.act(o)
                actions = {a: (int(ks[i]), np.clip(us[i], -1, 1).astype(np.float32))
                           for i, a in enumerate(env.possible_agents)}
                obs, rew, term, trunc, _ = env.step(actions)
                done = all(term.values()) or all(trunc.values())
                with torch.no_grad():
                    V.append(float(self.critic(torch.as_tensor(s)[None])))
                O.append(o); S.append(s); K.append(ks); U.append(us); LP.append(lps)
                R.append(float(next(iter(rew.values())))); D.append(done)
                if done:
                    ep += 1
                    obs, _ = env.reset(seed=seed + ep)
            done_steps += cfg.rollout_steps
            with torch.no_grad():
                last_v = float(self.critic(torch.as_tensor(env.state())[None]))
            adv = np.zeros(len(R), dtype=np.float32)
            gae = 0.0
            for t in reversed(range(len(R))):
                nv = last_v if t == len(R) - 1 else V[t + 1]
                nonterm = 0.0 if D[t] else 1.0
                delta = R[t] + cfg.gamma * nv * nonterm - V[t]
                gae = delta + cfg.gamma * cfg.gae_lambda * nonterm * gae
                adv[t] = gae
            ret = adv + np.array(V, dtype=np.float32)
            log = self._update(np.stack(O), np.stack(S), np.stack(K), np.stack(U), np.stack(LP), adv, ret)
            log.update(step=done_steps, reward=float(np.mean(R)))
            logs.append(log)
            if on_update:
                on_update(len(logs), log)
        return logs

    def _update(self, O: np.ndarray, S: np.ndarray, K: np.ndarray, U: np.ndarray, LP: np.ndarray,
                adv: np.ndarray, ret: np.ndarray) -> dict[str, float]:
        cfg = self.cfg
        O_t, S_t = torch.as_tensor(O), torch.as_tensor(S)
        K_t, U_t, LP_t = torch.as_tensor(K), torch.as_tensor(U, dtype=torch.float32), torch.as_tensor(LP,
                                                                                                      dtype=torch.float32)
        A = torch.as_tensor((adv - adv.mean()) / (adv.std() + 1e-8))
        G = torch.as_tensor(ret)
        T = O.shape[0]
        mb = max(1, T // cfg.minibatches)
        pl = vl = 0.0
        for _ in range(cfg.epochs):
            perm = torch.randperm(T, generator=self.gen)
            for i in range(0, T, mb):
                idx = perm[i:i + mb]
                loss_pi = torch.zeros(())
                for j, actor in enumerate(self.actors):
                    cat, gauss = actor.dists(O_t[idx, j])
                    lp = cat.log_prob(K_t[idx, j]) + gauss.log_prob(U_t[idx, j]).sum(-1)
                    ratio = torch.exp(lp - LP_t[idx, j])
                    surr = torch.min(ratio * A[idx], torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * A[idx])
                    loss_pi = loss_pi - surr.mean() - cfg.entropy_discrete * cat.entropy().mean() \
                        - cfg.entropy_continuous * gauss.entropy().sum(-1).mean()
                self.opt_actor.zero_grad(set_to_none=True)
                loss_pi.backward()
                nn.utils.clip_grad_norm_(self.actors.parameters(), cfg.max_grad_norm)
                self.opt_actor.step()
                loss_v = cfg.value_coef * ((self.critic(S_t[idx]).squeeze(-1) - G[idx]) ** 2).mean()
                self.opt_critic.zero_grad(set_to_none=True)
                loss_v.backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.opt_critic.step()
                pl, vl = float(loss_pi.detach()), float(loss_v.detach())
        return {"policy_loss": pl, "value_loss": vl}

    def save(self, path: Any) -> None:
        """safetensors (weights only) with the config, agent count, sizes and the environment's name, options and
        observation layout in its metadata; written to a temp path, then renamed."""
        from safetensors.torch import save

        from effai.files import atomic_write

        tensors = {f"actors.{k}": v.detach().contiguous() for k, v in self.actors.state_dict().items()}
        tensors.update({f"critic.{k}": v.detach().contiguous() for k, v in self.critic.state_dict().items()})
        meta = {"format": FORMAT, "n_agents": str(self.n_agents), "n_discrete": str(self.n_discrete),
                "n_continuous": str(self.n_continuous), "obs_dim": str(self.obs_dim),
                "state_dim": str(self.state_dim), "config": json.dumps(asdict(self.cfg)),
                "env": json.dumps(self.env_info)}
        atomic_write(Path(path), save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: Any, env: Any = None) -> MAHPPO:
        """A policy saved by `save` (safetensors: tensors and string metadata only, nothing is unpickled); with
        `env`, refused unless it was trained for that environment (devices, options, observation layout)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"no policy file {path}; train one with effai collab train-policy")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{path} is not a safetensors policy ({str(e).splitlines()[0][:120]}); train one with "
                             "effai collab train-policy") from None
        if meta.get("format") != FORMAT:
            raise UsageError(f"{path} is not an {FORMAT} policy (metadata format {meta.get('format')!r}); train one "
                             "with effai collab train-policy")
        try:
            known = {f.name for f in fields(PPOConfig)}
            cfg = PPOConfig(**{k: v for k, v in json.loads(meta["config"]).items() if k in known})
            agent = cls(int(meta["obs_dim"]), int(meta["state_dim"]), int(meta["n_agents"]), int(meta["n_discrete"]),
                        int(meta["n_continuous"]), cfg)
            agent.env_info = json.loads(meta["env"])
            agent.actors.load_state_dict({k[len("actors."):]: v for k, v in tensors.items() if k.startswith("actors.")})
            agent.critic.load_state_dict({k[len("critic."):]: v for k, v in tensors.items() if k.startswith("critic.")})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"{path}: the policy's metadata or weights do not fit together ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]}); re-train it") from None
        if env is not None:
            agent.check_env(env)
        return agent
