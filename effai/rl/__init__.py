"""Reinforcement learning for effai's system problems: MAHPPO (multi-agent hybrid-action PPO) and the baselines it
is compared with. Environment-agnostic (PettingZoo ParallelEnv API); docs/split.md.
"""
