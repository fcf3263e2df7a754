"""The split-inference environment (PettingZoo parallel API, Gymnasium wrapper, the latency/energy formulas) and
MAHPPO (learns to beat random play on a tiny configuration)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effai.collab.env import EnvConfig, JointGymEnv, SplitInferenceEnv, SplitProfile, shannon_rate, system_cost
from effai.errors import UsageError
from effai.rl.mahppo import MAHPPO, PPOConfig

# A small profile with the shape of the measured one (benchmarks/results/split_profile_ghostnetv3_050_digits.json):
# offloading sends the 4 KB image, splits send autoencoder codes, local sends nothing.
PROFILE = SplitProfile(("offload", "early", "late", "local"), (0.0, 0.3, 0.9, 1.5), (1.5, 1.0, 0.4, 0.0),
                       (4096, 384, 112, 0), (0.99, 0.97, 0.98, 0.99))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_parallel_api_and_gymnasium_checks_pass():
    """PettingZoo's and Gymnasium's own conformance checks: each raises on the first violation of its API."""
    from gymnasium.utils.env_checker import check_env
    from pettingzoo.test import parallel_api_test

    parallel_api_test(SplitInferenceEnv(PROFILE, EnvConfig(n_devices=3, episode_steps=5)), num_cycles=50)
    check_env(JointGymEnv(PROFILE, EnvConfig(n_devices=2, episode_steps=5)), skip_render_check=True)


def test_latency_and_energy_follow_the_documented_formulas():
    cfg = EnvConfig(n_devices=2)
    gains = np.array([1e-9, 1e-10])
    cost = system_cost(PROFILE, cfg, gains, np.array([1, 3]), np.array([0.5, 0.5]))
    rate = shannon_rate(cfg.bandwidth_hz, 0.5, 1e-9, cfg.noise_dbm_hz)     # only device 0 transmits: whole band
    tx = 384 * 8 / rate
    assert cost.latency_s[0] == pytest.approx(0.3e-3 + tx + 1.0e-3 / cfg.server_speedup)
    assert cost.energy_j[0] == pytest.approx(cfg.device_power_w * 0.3e-3 + 0.5 * tx)
    assert cost.latency_s[1] == pytest.approx(1.5e-3) and cost.energy_j[1] == pytest.approx(2 * 1.5e-3)
    both = system_cost(PROFILE, cfg, np.array([1e-9, 1e-9]), np.array([1, 1]), np.array([0.5, 0.5]))
    half = shannon_rate(cfg.bandwidth_hz / 2, 0.5, 1e-9, cfg.noise_dbm_hz)
    assert both.tx_s[0] == pytest.approx(384 * 8 / half) and half < rate    # bandwidth shared by the senders
    assert math.isclose(both.latency_s[0] - both.tx_s[0], 0.3e-3 + 2 * 1.0e-3 / cfg.server_speedup)  # server shared


def test_bad_input_is_one_line_usage_errors():
    with pytest.raises(UsageError, match="one value per option"):
        SplitProfile(("a", "b"), (1.0,), (1.0, 2.0), (1, 0), (1.0, 1.0))
    env = SplitInferenceEnv(PROFILE, EnvConfig(n_devices=3))
    env.reset(seed=0)
    with pytest.raises(UsageError, match="missing for device_2"):
        env.step({"device_0": (0, np.zeros(1)), "device_1": (0, np.zeros(1))})
    agent = MAHPPO.for_env(SplitInferenceEnv(PROFILE, EnvConfig(n_devices=2)))
    with pytest.raises(UsageError, match="trained for 2 devices but the environment has 3"):
        agent.train(env, 10)


def _mean_reward(policy, n_devices: int, episodes: int = 10) -> float:
    env = SplitInferenceEnv(PROFILE, EnvConfig(n_devices=n_devices, episode_steps=8))
    total = []
    for e in range(episodes):
        obs, _ = env.reset(seed=500 + e)
        while env.agents:
            obs, r, *_ = env.step(policy(env, obs))
            total.append(next(iter(r.values())))
    return float(np.mean(total))


def test_mahppo_beats_random_play_in_a_few_seconds():
    cfg = EnvConfig(n_devices=3, episode_steps=8)
    agent = MAHPPO.for_env(SplitInferenceEnv(PROFILE, cfg), PPOConfig(seed=0))
    logs = agent.train(SplitInferenceEnv(PROFILE, cfg), 128 * 8, seed=0)
    rng = np.random.default_rng(0)
    rand = _mean_reward(lambda env, obs: {a: (int(rng.integers(env.n_options)), rng.uniform(-1, 1, 1))
                                          for a in env.possible_agents}, 3)
    learned = _mean_reward(agent.policy(), 3)
    assert learned > rand + 0.1, (learned, rand)
    assert logs[-1]["reward"] > logs[0]["reward"]


def test_saved_policy_loads_acts_the_same_and_refuses_another_environment(tmp_path):
    cfg = EnvConfig(n_devices=2, episode_steps=4)
    agent = MAHPPO.for_env(SplitInferenceEnv(PROFILE, cfg), PPOConfig(seed=3, hidden=16))
    agent.train(SplitInferenceEnv(PROFILE, cfg), 128, seed=3)
    path = tmp_path / "p.safetensors"
    agent.save(path)
    back = MAHPPO.load(path, SplitInferenceEnv(PROFILE, cfg))
    assert back.cfg == agent.cfg and back.env_info["options"] == list(PROFILE.options)
    obs = np.random.default_rng(0).uniform(-2, 2, (2, 3)).astype(np.float32)
    k0, u0, _ = agent.act(obs, deterministic=True)
    k1, u1, _ = back.act(obs, deterministic=True)
    assert np.array_equal(k0, k1) and np.allclose(u0, u1)
    with pytest.raises(UsageError, match="trained for 2 devices but the environment has 3"):
        MAHPPO.load(path, SplitInferenceEnv(PROFILE, EnvConfig(n_devices=3)))
    other = SplitProfile(("offload", "mid", "late", "local"), PROFILE.device_ms, PROFILE.server_ms, PROFILE.bytes,
                         PROFILE.top1)
    with pytest.raises(UsageError, match="another options"):
        MAHPPO.load(path, SplitInferenceEnv(other, cfg))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")          # a pickle opcode: must not be unpickled
    with pytest.raises(UsageError, match="not a safetensors policy"):
        MAHPPO.load(junk)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="not an effai.mahppo/1 policy"):
        MAHPPO.load(tmp_path / "w.safetensors")
    with pytest.raises(UsageError, match="no policy file"):
        MAHPPO.load(tmp_path / "missing.safetensors")


def test_gain_from_rate_inverts_the_shannon_rate():
    from effai.collab.env import gain_from_rate

    r = shannon_rate(2.5e5, 0.3, 3e-10, -174.0)
    assert gain_from_rate(r, 0.3, 2.5e5, -174.0) == pytest.approx(3e-10, rel=1e-9)


def test_cli_train_policy_from_a_profile_saves_a_loadable_policy(tmp_path, capfd):
    """The command's function in-process (a subprocess would spend most of its time importing)."""
    import json

    import typer

    from effai import console
    from effai.cli.collab import train_policy_cmd

    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"options": list(PROFILE.options), "device_ms": list(PROFILE.device_ms),
                                "server_ms": list(PROFILE.server_ms), "bytes": list(PROFILE.bytes),
                                "top1": list(PROFILE.top1)}))
    out = tmp_path / "pol.safetensors"
    console.reset()       # the consoles write to a dup of fd 1, which capfd captures
    try:
        train_policy_cmd(None, out, None, prof, "onnx", 2, 128, 10.0, 0, True)
        last = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert last["ok"] and last["options"] == list(PROFILE.options) and last["steps"] == 128
        assert MAHPPO.load(out).n_agents == 2 and torch.get_num_threads() == 1     # the fixture's setting restored
        with pytest.raises(typer.Exit) as exc:
            train_policy_cmd(None, out, None, None, "onnx", 2, 128, 10.0, 0, True)
        assert exc.value.exit_code == 2
        assert "SPLIT_DIRS" in json.loads(capfd.readouterr().out.strip().splitlines()[-1])["error"]
    finally:
        console.reset()
