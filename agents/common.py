"""Small pieces every agent and the trainer share: the transition record, the agent interface, devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass
class Transition:
    """One batched env step, as the trainer hands it to `agent.observe`. N = number of envs.

    `next_obs` is what the agent acts on next; where an episode ended it is already the first observation of
    the next episode (same-step autoreset), and the true last observation is in `final_obs`.
    """

    obs: Any  # [N, ...] the observation the action was chosen for
    action: Any  # [N] (or a list of completions for text games)
    reward: np.ndarray  # [N] learning reward (clipped on Atari)
    terminated: np.ndarray  # [N] bool: the episode reached a terminal state (no bootstrap)
    truncated: np.ndarray  # [N] bool: cut by a time limit (bootstrap from final_obs)
    next_obs: Any  # [N, ...]
    final_obs: Any  # [N, ...] equals next_obs where the episode did not end
    info: dict


class Agent(Protocol):
    """What the trainer needs from an agent. PPO, DQN and the LM agent all implement it, nothing more."""

    def act(self, obs: Any, explore: bool = True) -> Any:
        """Actions for a batch of observations, in the form the env's `step` takes.
        `explore=False` is for evaluation: greedy, and records nothing for learning."""

    def observe(self, transition: Transition) -> None:
        """Record the outcome of the last `act(..., explore=True)`."""

    def ready(self) -> bool:
        """Whether the agent wants `update` now (PPO: rollout full; DQN: every train_freq steps)."""

    def update(self, global_step: int, total_steps: int) -> dict[str, Any]:
        """Learn from what was observed. Returns TensorBoard scalars (`losses/...`, `charts/...`); str values go
        to the text panel."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU. Anything else is passed to torch, with a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e}). Use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no CUDA GPU. Use --device cpu (or auto).")
    return dev


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (all positions if mask is None)."""
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that a run is repeatable on the same machine."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
