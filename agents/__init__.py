"""ponglab's agents and the one trainer they share.

    from agents import PPO, PPOConfig, Trainer, TrainConfig
    from games import make
"""

from agents.common import Agent, Transition, resolve_device, seed_everything
from agents.ppo import PPO, PPOConfig
from agents.trainer import TrainConfig, Trainer, evaluate

__all__ = ["Agent", "PPO", "PPOConfig", "TrainConfig", "Trainer", "Transition", "evaluate", "resolve_device",
           "seed_everything"]

try:  # DQN is its own piece; export it when present
    from agents.dqn import DQN, DQNConfig  # noqa: F401

    __all__ += ["DQN", "DQNConfig"]
except ModuleNotFoundError as e:  # pragma: no cover
    if e.name != "agents.dqn":
        raise
