"""Networks shared by the agents: the Nature-DQN CNN for pixels, an MLP for vectors, and the heads on top."""

from __future__ import annotations

import math

import torch
from torch import nn


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights, constant bias: the initialisation PPO implementations rely on (Engstrom et al. 2020)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class NatureCNN(nn.Module):
    """Mnih et al. (2015): 3 conv layers + 512-unit layer. Input uint8 `[B, C, 84, 84]`, output `[B, 512]`."""

    def __init__(self, in_channels: int, out_dim: int = 512):
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, 32, 8, stride=4)), nn.ReLU(),  # [B, 32, 20, 20]
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),  # [B, 64, 9, 9]
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),  # [B, 64, 7, 7]
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, out_dim)), nn.ReLU(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # Frames travel and are stored as uint8 (4x less memory and bandwidth); scale on the device.
        return self.net(obs.float() / 255.0)


class MLP(nn.Module):
    """Two tanh hidden layers: the classic-control torso. Input `[B, obs_dim]`, output `[B, hidden]`."""

    def __init__(self, in_dim: int, hidden: int = 64):
        super().__init__()
        self.out_dim = hidden
        self.net = nn.Sequential(
            layer_init(nn.Linear(in_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float())


def make_torso(obs_shape: tuple[int, ...]) -> nn.Module:
    """Pick the torso by observation shape: images `[C, H, W]` -> NatureCNN, vectors `[D]` -> MLP."""
    if len(obs_shape) == 3:
        return NatureCNN(obs_shape[0])
    if len(obs_shape) == 1:
        return MLP(obs_shape[0])
    raise ValueError(f"No network for observations of shape {obs_shape}: expected [C, H, W] images or [D] vectors.")


class ActorCritic(nn.Module):
    """Policy logits and state value. Pixels share one CNN torso (as in the PPO paper's Atari setup);
    vectors get separate actor and critic MLPs, which is more stable on classic control."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int):
        super().__init__()
        self.shared = len(obs_shape) == 3
        self.actor_torso = make_torso(obs_shape)
        self.critic_torso = self.actor_torso if self.shared else make_torso(obs_shape)
        # Small init of the policy head: near-uniform initial policy, so early exploration is broad.
        self.actor = layer_init(nn.Linear(self.actor_torso.out_dim, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(self.critic_torso.out_dim, 1), std=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits `[B, A]` and values `[B]`."""
        h = self.actor_torso(obs)
        hc = h if self.shared else self.critic_torso(obs)
        return self.actor(h), self.critic(hc).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.critic_torso(obs)).squeeze(-1)
