"""MR-GRPO, DeepGen's stage 3, as components (``deepgen_components.rl``).

* :mod:`~deepgen_components.rl.sampling` — the stochastic denoising steps with log-probabilities (CPS,
  Flow-GRPO's SDE); the deterministic Euler step and CFG live with the one denoising runner
  (:mod:`deepgen_components.denoising`);
* :mod:`~deepgen_components.rl.grpo` — :func:`rollout`, the advantages (:func:`gdpo_advantages`,
  :func:`grpo_advantages`), :class:`MRGRPOLoss`;
* :mod:`~deepgen_components.rl.rewards` — the reward protocol, the registry and the built-in rewards.

The recipe that trains with them (prompt pools, checkpoints, ranks) is ``deepgen_components.training.rl``.
"""

from deepgen_components.rl.grpo import (
    MRGRPOLoss,
    Trajectory,
    gdpo_advantages,
    grpo_advantages,
    policy_step_log_prob,
    rollout,
    select_timesteps,
)
from deepgen_components.rl.sampling import cps_step, flow_grpo_step

__all__ = [
    "MRGRPOLoss",
    "Trajectory",
    "cps_step",
    "flow_grpo_step",
    "gdpo_advantages",
    "grpo_advantages",
    "policy_step_log_prob",
    "rollout",
    "select_timesteps",
]
