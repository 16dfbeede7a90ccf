"""Proximal Policy Optimization (Schulman et al. 2017), read top to bottom.

The agent collects `num_steps` steps from `num_envs` envs into tensors preallocated on the training device,
computes advantages with GAE, then runs `update_epochs` passes of minibatch SGD on the clipped surrogate
objective. The two loss functions, `policy_loss` and `value_loss`, are written out below and are the very
same ones the language-model agent (`llm_bridge/agent.py`) calls: there a "sample" is a token, so they accept
per-sample tensors `[B]` and per-token tensors `[B, T]` with a mask.

Defaults are the published Atari settings (PPO paper / CleanRL `ppo_atari.py` / rl-zoo3): 8 envs x 128 steps,
4 epochs of 4 minibatches, lr 2.5e-4 annealed to 0, clip 0.1, entropy 0.01, GAE lambda 0.95, gamma 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from agents.common import Transition, masked_mean
from agents.networks import ActorCritic


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters."""

    num_steps: int = 128
    """Steps collected per env before each update (the rollout length)."""
    num_minibatches: int = 4
    """Minibatches per epoch; the batch (num_envs x num_steps) must divide evenly into them."""
    update_epochs: int = 4
    """Passes over each rollout."""
    lr: float = 2.5e-4
    """Adam learning rate."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over the run (over `steps`, or the `--train-minutes` if they end
    first)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda: 0 = one-step TD advantages, 1 = Monte-Carlo returns."""
    clip_coef: float = 0.1
    """Clip range of the probability ratio (and of the value update when clip_vloss)."""
    clip_vloss: bool = True
    """Clip the value-function update like the policy's (as in the original PPO code)."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Clip the global gradient norm to this."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    target_kl: float | None = None
    """Stop the epochs early when the approximate KL to the rollout policy exceeds this (None: never)."""

    def validate(self, num_envs: int) -> None:
        """Raise a one-line ValueError naming the bad field."""
        for name in ("num_steps", "num_minibatches", "update_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma} and {self.gae_lambda}.")
        if self.clip_coef <= 0:
            raise ValueError(f"clip_coef must be positive, got {self.clip_coef}.")
        batch = num_envs * self.num_steps
        if batch % self.num_minibatches:
            raise ValueError(
                f"num_minibatches: the batch num_envs x num_steps = {num_envs} x {self.num_steps} = {batch} "
                f"does not divide into {self.num_minibatches} minibatches; pick a divisor of {batch}."
            )


# Published classic-control settings (rl-zoo3 CartPole-v1): solves CartPole well inside 100k steps.
CLASSIC_PPO = PPOConfig(
    num_steps=32, num_minibatches=1, update_epochs=20, lr=1e-3, gamma=0.98, gae_lambda=0.8,
    clip_coef=0.2, ent_coef=0.0,
)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016). All inputs `[T, N]`.

    `next_values[t]` is V of the true next state s_{t+1}: on a truncated step that is V(final_obs), so a
    time-limit cut still bootstraps; on a terminated step it is ignored (there is no future). `episode_end`
    (terminated or truncated) stops the lambda-recursion from leaking into the next episode.
    Returns advantages and returns (advantages + values), both `[T, N]`.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])  # [N]
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        running = delta + gamma * lam * (1.0 - episode_end[t]) * running
        advantages[t] = running
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_coef: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate loss, for actions `[B]` or tokens `[B, T]` (with `mask [B, T]`).

    Advantages may be `[B]` (one per sequence, broadcast over its tokens) or the same shape as `logprobs`.
    Token losses are averaged over all unmasked tokens of the batch (not per sequence first), so long and
    short answers weigh by their token count, as in DAPO / Dr. GRPO.
    """
    if logprobs.dim() == 2 and advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1]: the sequence's advantage for each of its tokens
    logratio = logprobs - old_logprobs
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),  # Schulman's low-variance KL estimator
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_coef).float(), mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """0.5 * squared error to the returns; with `clip_coef`, the pessimum of clipped and unclipped updates."""
    unclipped = (values - returns) ** 2
    if clip_coef is None:
        return 0.5 * masked_mean(unclipped, mask)
    clipped = (old_values + torch.clamp(values - old_values, -clip_coef, clip_coef) - returns) ** 2
    return 0.5 * masked_mean(torch.max(unclipped, clipped), mask)


class PPO:
    """PPO for discrete actions on pixels (Nature CNN) or vectors (MLP). See `agents.common.Agent`."""

    def __init__(self, config: PPOConfig, observation_space, action_space, num_envs: int, device: torch.device):
        config.validate(num_envs)
        self.cfg, self.num_envs, self.device = config, num_envs, torch.device(device)
        obs_shape = tuple(observation_space.shape)
        self.net = ActorCritic(obs_shape, int(action_space.n)).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, eps=1e-5)
        # Rollout storage, preallocated on the training device. Frames stay uint8 (scaled in the network).
        T, N = config.num_steps, num_envs
        obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
        self.obs = torch.zeros((T, N) + obs_shape, dtype=obs_dtype, device=self.device)
        self.actions = torch.zeros((T, N), dtype=torch.long, device=self.device)
        self.logprobs = torch.zeros((T, N), device=self.device)
        self.values = torch.zeros((T, N), device=self.device)
        self.rewards = torch.zeros((T, N), device=self.device)
        self.terminated = torch.zeros((T, N), device=self.device)
        self.episode_end = torch.zeros((T, N), device=self.device)
        self.bootstrap = torch.full((T, N), float("nan"), device=self.device)  # V(final_obs) on truncated steps
        self.last_next_obs: torch.Tensor | None = None
        self.t = 0  # write position in the rollout

    def _tensor(self, x) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=self.device)

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        obs_t = self._tensor(obs)  # [N, ...] still uint8 for frames
        logits, value = self.net(obs_t)
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample() if explore else logits.argmax(-1)
        if explore:
            self.obs[self.t] = obs_t
            self.actions[self.t] = action
            self.logprobs[self.t] = dist.log_prob(action)
            self.values[self.t] = value
        return action.cpu().numpy()

    @torch.no_grad()
    def observe(self, tr: Transition) -> None:
        t = self.t
        self.rewards[t] = self._tensor(tr.reward).float()
        term, trunc = self._tensor(tr.terminated), self._tensor(tr.truncated)
        self.terminated[t] = term.float()
        self.episode_end[t] = (term | trunc).float()
        self.bootstrap[t] = float("nan")
        if tr.truncated.any():  # a time limit is not the end of the world: bootstrap from the true last state
            idx = np.flatnonzero(tr.truncated)
            self.bootstrap[t, idx] = self.net.value(self._tensor(tr.final_obs[idx]))
        self.last_next_obs = self._tensor(tr.next_obs)
        self.t += 1

    def ready(self) -> bool:
        return self.t == self.cfg.num_steps

    def update(self, global_step: int, total_steps: int) -> dict[str, float]:
        cfg = self.cfg
        batch_steps = cfg.num_steps * self.num_envs
        if cfg.anneal_lr:  # linear decay, measured at the start of this rollout
            frac = max(0.0, 1.0 - (global_step - batch_steps) / total_steps)
            self.optimizer.param_groups[0]["lr"] = frac * cfg.lr
        with torch.no_grad():
            # next_values[t] = V(s_{t+1}): the next row's value, V(final_obs) where truncated, V(last obs) at the end.
            next_values = torch.empty_like(self.values)
            next_values[:-1] = self.values[1:]
            next_values[-1] = self.net.value(self.last_next_obs)
            next_values = torch.where(torch.isnan(self.bootstrap), next_values, self.bootstrap)
            advantages, returns = compute_gae(
                self.rewards, self.values, next_values, self.terminated, self.episode_end, cfg.gamma, cfg.gae_lambda
            )
        # Flatten [T, N, ...] -> [T*N, ...]
        b_obs = self.obs.reshape((batch_steps,) + self.obs.shape[2:])
        b_actions, b_logprobs = self.actions.reshape(-1), self.logprobs.reshape(-1)
        b_adv, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), self.values.reshape(-1)

        mb_size = batch_steps // cfg.num_minibatches
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")}
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(batch_steps, device=self.device)
            for start in range(0, batch_steps, mb_size):
                mb = perm[start : start + mb_size]
                logits, new_values = self.net(b_obs[mb])
                dist = torch.distributions.Categorical(logits=logits)
                mb_adv = b_adv[mb]
                if cfg.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss, pg_stats = policy_loss(dist.log_prob(b_actions[mb]), b_logprobs[mb], mb_adv, cfg.clip_coef)
                v_loss = value_loss(new_values, b_values[mb], b_returns[mb], cfg.clip_coef if cfg.clip_vloss else None)
                entropy = dist.entropy().mean()
                loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy), *pg_stats.items()):
                    stats[k].append(v.detach())
            if cfg.target_kl is not None and pg_stats["approx_kl"] > cfg.target_kl:
                break
        self.t = 0
        # explained variance: how much of the return's variance the critic accounts for (1 = perfect).
        var_y = b_returns.var()
        explained_var = float("nan") if var_y == 0 else float(1 - (b_returns - b_values).var() / var_y)
        out = {f"losses/{k}": float(torch.stack(v).mean()) for k, v in stats.items()}
        out["losses/explained_variance"] = explained_var
        out["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return out

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The optimizer state carries the learning rate it was saved with; the config (maybe a --lr given to
        # --resume) is what counts. With anneal_lr the next update sets it from the config anyway.
        self.optimizer.param_groups[0]["lr"] = self.cfg.lr
        self.t = 0  # a resumed run starts a fresh rollout: the envs restart their episodes
