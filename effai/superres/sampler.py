"""A deterministic DDIM sampler (eta = 0; Song et al. 2021) over SRDiff's residual, around any step function."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from effai.zoo.srdiff import MAX_STEPS, MIN_STEPS, ddim_timesteps as timesteps  # noqa: F401  (the schedule's layer)

StepFn = Callable[[np.ndarray, int, np.ndarray], np.ndarray]   # (x_t (1,3,H,W), t, cond) -> eps


def ddim(step: StepFn, cond: np.ndarray, x_T: np.ndarray, abar: np.ndarray, steps: int,
         on_step: Callable[[], None] | None = None) -> np.ndarray:
    """x0 (the clipped residual) after `steps` DDIM updates. For t_i > t_{i+1} (t_{S} := -1, abar_{-1} = 1):
        eps = eps_theta(x_t, t),  x0 = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1),
        x_{t_{i+1}} = sqrt(abar_{t_{i+1}}) x0 + sqrt(1 - abar_{t_{i+1}}) eps.
    No noise is drawn: the output is a function of x_T alone (deterministic)."""
    x = x_T.astype(np.float32)
    ts = timesteps(len(abar), steps)
    x0 = x
    for i, t in enumerate(ts):
        eps = np.asarray(step(x, t, cond), np.float32).reshape(x.shape)
        ab = float(abar[t])
        x0 = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1).astype(np.float32)
        ab_next = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x = (np.sqrt(ab_next) * x0 + np.sqrt(1 - ab_next) * eps).astype(np.float32)
        if on_step:
            on_step()
    return x0
