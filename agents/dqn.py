"""Deep Q-Networks (Mnih et al. 2015), read top to bottom, with the common improvements as flags.

Every env step goes into a replay memory (`agents.replay`: frames stored once, n-step returns). Every
`train_freq` env steps (summed over envs) the agent samples a minibatch and regresses Q(s, a) on the
bootstrapped target

    y = R^(n) + gamma^n * (1 - done) * Q_target(s', argmax_a' Q_?(s', a'))

with the Huber loss (written out below). `Q_?` is the target network (DQN) or the online one
(`double_dqn`, van Hasselt et al. 2016). The target network is copied from the online one every
`target_update` env steps (or moved towards it by `tau`, Polyak averaging). Actions are epsilon-greedy,
with epsilon decayed linearly from `start_e` to `end_e` over the first `exploration_fraction` of the run.

Defaults are the published Atari settings (CleanRL `dqn_atari.py` / rl-zoo3): Adam lr 1e-4, batch 32,
one gradient step per 4 env steps, target copied every 1000 steps, learning from step 80k, epsilon
1 -> 0.01 over 10% of the run, 1M transitions of replay (where they fit). Several envs feed one
memory; the ratio of gradient steps to env steps stays the same whatever their number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.common import Transition, resolve_device
from agents.networks import NatureCNN
from agents.replay import ReplayMemory, ReplayMemoryTooLarge, _available_bytes
from agents.trainer import TrainConfig
from games import AtariConfig, GameSpec


@dataclass(frozen=True)
class DQNConfig:
    """DQN hyper-parameters. Step counts are env steps summed over envs, like --steps."""

    lr: float = 1e-4
    """Adam learning rate (constant)."""
    buffer_size: int = 1_000_000
    """Replay capacity in transitions. Atari default: 1M (7.1 GB of uint8 frames) where that fits in half the free
    memory of the training device, else the largest multiple of 100k that does."""
    replay_on_host: bool = False
    """Keep the replay in (pinned) host RAM and copy each minibatch to the GPU: for buffers larger than the GPU."""
    save_replay: bool = False
    """Put the replay memory in the checkpoints (large: up to GBs), so that --resume continues with it."""
    batch_size: int = 32
    """Transitions per gradient step."""
    gamma: float = 0.99
    """Discount factor."""
    n_step: int = 1
    """Bootstrap after n rewards (n-step returns; 1 = the original DQN target)."""
    learning_starts: int = 80_000
    """Fill the replay with this many steps before the first gradient step."""
    train_freq: int = 4
    """Env steps per `gradient_steps` gradient steps (with N envs, each batched step owes N / train_freq of them)."""
    gradient_steps: int = 1
    """Gradient steps per `train_freq` env steps."""
    target_update: int = 1000
    """Update the target network every this many env steps."""
    tau: float = 1.0
    """Target update rate: 1 = copy the online network (hard update), < 1 = Polyak averaging."""
    double_dqn: bool = False
    """Double DQN: the online network picks the next action, the target network values it."""
    dueling: bool = False
    """Dueling head: Q = V + A - mean(A) (Wang et al. 2016)."""
    prioritized: bool = False
    """Prioritized replay (proportional, Schaul et al. 2016), importance weights annealed to 1 over the run."""
    per_alpha: float = 0.6
    """How much prioritization is used (0 = uniform)."""
    per_beta0: float = 0.4
    """Initial importance-sampling exponent (annealed to 1)."""
    start_e: float = 1.0
    """Initial exploration epsilon."""
    end_e: float = 0.01
    """Final exploration epsilon."""
    exploration_fraction: float = 0.1
    """Fraction of --steps over which epsilon decays linearly from start_e to end_e."""
    eval_epsilon: float = 0.01
    """Epsilon of evaluation (act(explore=False)): a greedy Atari agent can get stuck forever (e.g. never pressing
    FIRE after losing a life), so evaluations conventionally keep 1% random actions (Machado et al. 2018 use 0.01)."""
    max_grad_norm: float = 10.0
    """Clip the global gradient norm to this (as SB3; 0 = no clipping)."""
    mlp_hidden: int = 256
    """Hidden units of the two-layer MLP used for vector observations (classic control)."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the bad field."""
        for name in ("buffer_size", "batch_size", "n_step", "train_freq", "gradient_steps", "target_update",
                     "mlp_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.lr <= 0 or self.learning_starts < 0 or self.max_grad_norm < 0:
            raise ValueError("lr must be positive and learning_starts, max_grad_norm >= 0.")
        for name in ("gamma", "start_e", "end_e", "exploration_fraction", "eval_epsilon", "per_alpha", "per_beta0"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}.")


# Classic control (CartPole): rl-zoo3's DQN recipe (batch 64, 256x256 net, epsilon to 0.04 over 16%, one gradient
# step per 2 env steps, target refreshed every 128 gradient steps, 50k steps) with lr 1e-3 instead of 2.3e-3: on
# our CPU, seeds 1-8 all evaluated >= 195 after 50k steps (235-500), 3 of 4 with 2.3e-3. Greedy evaluation.
CLASSIC_DQN = DQNConfig(
    lr=1e-3, buffer_size=100_000, batch_size=64, learning_starts=1000, train_freq=2, target_update=256,
    end_e=0.04, exploration_fraction=0.16, eval_epsilon=0.0, mlp_hidden=256,
)


def huber(x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Quadratic for |x| <= delta, linear beyond: large TD errors (early, or after reward surprises) do not
    produce huge gradients. Same as F.smooth_l1_loss(reduction='none') for delta = 1."""
    ax = x.abs()
    return torch.where(ax <= delta, 0.5 * x**2, delta * (ax - 0.5 * delta))


class QNetwork(nn.Module):
    """Q-values `[B, A]` from pixels `[B, C, 84, 84]` (Nature CNN) or vectors `[B, D]` (MLP)."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, dueling: bool = False, hidden: int = 256):
        super().__init__()
        if len(obs_shape) == 3:
            self.torso, d = NatureCNN(obs_shape[0]), 512
        elif len(obs_shape) == 1:
            # ReLU and PyTorch's default init, as in CleanRL's and SB3's DQN. (With PPO's tanh MLP and orthogonal
            # init, the rl-zoo3 recipe solved 0 of 3 CartPole seeds here; ReLU + orthogonal 1 of 3; this 3 of 3.)
            self.torso, d = nn.Sequential(nn.Linear(obs_shape[0], hidden), nn.ReLU(),
                                          nn.Linear(hidden, hidden), nn.ReLU()), hidden
        else:
            raise ValueError(f"No Q-network for observations of shape {obs_shape}: expected [C, H, W] or [D].")
        self.dueling = dueling
        # Dueling: both streams read the torso's features (Wang et al. give each stream its own hidden layer).
        self.head = nn.Linear(d, num_actions)  # Q, or the advantages A when dueling
        self.value = nn.Linear(d, 1) if dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso(obs if obs.dtype == torch.uint8 else obs.float())  # [B, d] (NatureCNN scales uint8 itself)
        q = self.head(h)  # [B, A]
        if self.dueling:
            # Subtracting the mean advantage makes V and A identifiable (any constant could move between them).
            q = self.value(h) + q - q.mean(-1, keepdim=True)
        return q


class DQN:
    """DQN for discrete actions on pixels or vectors. See `agents.common.Agent` for the interface."""

    def __init__(self, config: DQNConfig, observation_space, action_space, num_envs: int, device: torch.device,
                 total_steps: int, clip_rewards: bool = False, seed: int | None = None):
        config.validate()
        self.cfg, self.num_envs, self.device = config, num_envs, torch.device(device)
        self.total_steps, self.clip_rewards, self.seed = total_steps, clip_rewards, seed
        self.obs_shape = tuple(observation_space.shape)
        self.obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
        self.num_actions = int(action_space.n)
        self.q = QNetwork(self.obs_shape, self.num_actions, config.dueling, config.mlp_hidden).to(self.device)
        self.target = QNetwork(self.obs_shape, self.num_actions, config.dueling, config.mlp_hidden).to(self.device)
        self.target.load_state_dict(self.q.state_dict())
        self.target.requires_grad_(False)
        # fused: one kernel for the whole update instead of a dozen per tensor (25% faster steps for small nets)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=config.lr, fused=True)
        # Frames: axis 0 of an image observation is the stack, which the memory stores once per frame.
        self.frame_stack = self.obs_shape[0] if len(self.obs_shape) == 3 else 1
        check_replay_fits(config, self.obs_shape, self.obs_dtype, self.frame_stack, self.device)
        self.replay: ReplayMemory | None = None  # allocated on the first observe: `ponglab eval` never needs it
        self.saved_replay: dict | None = None  # replay state from a checkpoint, restored on first use
        self.env_steps = 0  # env steps observed, summed over envs
        self.grad_steps = 0
        self.grad_credit = 0.0  # gradient steps owed (fractional when num_envs is not a multiple of train_freq)
        self.learn_from = config.learning_starts  # env step from which we learn (moves on a resume without replay)
        self.last_target_update = 0

    # -- acting ----------------------------------------------------------------------------------------
    def epsilon(self) -> float:
        """Linear from start_e to end_e over the first exploration_fraction * total_steps env steps, then flat."""
        c = self.cfg
        frac = min(1.0, self.env_steps / max(c.exploration_fraction * self.total_steps, 1.0))
        return c.start_e + frac * (c.end_e - c.start_e)

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        n = len(obs)
        eps = self.epsilon() if explore else self.cfg.eval_epsilon
        random_mask = torch.rand(n) < eps  # [N]
        actions = torch.randint(self.num_actions, (n,))  # [N]
        if not random_mask.all():  # while epsilon is 1, skip the network altogether
            q = self.q(torch.as_tensor(obs, device=self.device))  # [N, A]
            actions = torch.where(random_mask, actions, q.argmax(-1).cpu())
        return actions.numpy()

    # -- memory ----------------------------------------------------------------------------------------
    def _make_replay(self) -> ReplayMemory:
        c = self.cfg
        return ReplayMemory(
            c.buffer_size, self.num_envs, self.obs_shape, self.obs_dtype, self.frame_stack, gamma=c.gamma,
            n_step=c.n_step, clip_rewards=self.clip_rewards, pad="zeros", prioritized=c.prioritized,
            alpha=c.per_alpha, beta0=c.per_beta0, beta_steps=max(1, self._planned_grad_steps()),
            device=self.device, pin_memory=c.replay_on_host, seed=self.seed,
        )

    def _planned_grad_steps(self) -> int:
        c = self.cfg
        return int((self.total_steps - c.learning_starts) * c.gradient_steps / c.train_freq)

    def _memory(self) -> ReplayMemory:
        """The replay memory, allocated on first use (restored from the checkpoint when it had one)."""
        if self.replay is None:
            self.replay = self._make_replay()
            if self.saved_replay is not None:
                self.replay.load_state_dict(self.saved_replay)
                # The envs restart their episodes on resume: no stack or n-step return may cross the cut.
                self.replay.start_new_episodes()
                self.saved_replay = None
        return self.replay

    def observe(self, tr: Transition) -> None:
        # The memory keeps raw rewards and clips them itself (clip_rewards), so raw scores stay inspectable.
        raw = tr.info.get("raw_reward", tr.reward)
        self._memory().add(tr.obs, tr.action, raw, tr.terminated, tr.truncated, tr.final_obs)
        self.env_steps += self.num_envs
        if self.env_steps >= self.learn_from:
            self.grad_credit += self.num_envs * self.cfg.gradient_steps / self.cfg.train_freq

    def ready(self) -> bool:
        return (self.env_steps >= self.learn_from and self.grad_credit >= 1
                and self.replay is not None and self.replay.steps_added > self.cfg.n_step)

    # -- learning --------------------------------------------------------------------------------------
    def update(self, global_step: int, total_steps: int) -> dict[str, Any]:
        c = self.cfg
        n_updates = int(self.grad_credit)
        self.grad_credit -= n_updates
        td_losses, q_values = [], []
        for _ in range(n_updates):
            b = self.replay.sample(c.batch_size)
            with torch.no_grad():
                next_q_target = self.target(b.next_obs)  # [B, A]
                if c.double_dqn:  # decouple choosing the action (online net) from valuing it (target net)
                    next_a = self.q(b.next_obs).argmax(-1, keepdim=True)  # [B, 1]
                    next_q = next_q_target.gather(1, next_a).squeeze(1)  # [B]
                else:
                    next_q = next_q_target.max(-1).values  # [B]
                # n-step target; `dones` only for termination: a truncated episode still bootstraps.
                y = b.returns + (1.0 - b.dones) * b.discounts * next_q  # [B]
            q_sa = self.q(b.obs).gather(1, b.actions[:, None]).squeeze(1)  # [B]
            td = q_sa - y  # [B]
            loss = (b.weights * huber(td)).mean()  # weights: PER's importance correction (1 for uniform)

            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm:
                nn.utils.clip_grad_norm_(self.q.parameters(), c.max_grad_norm)
            self.optimizer.step()
            if c.prioritized:
                self.replay.update_priorities(b.indices, td.detach())
            self.grad_steps += 1
            td_losses.append(loss.detach())
            q_values.append(q_sa.detach().mean())

        if self.env_steps - self.last_target_update >= c.target_update:
            self.update_target()
            self.last_target_update = self.env_steps
        out: dict[str, Any] = {
            "charts/epsilon": self.epsilon(),
            "charts/replay_size": len(self.replay),
            "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
        }
        if td_losses:
            out["losses/td_loss"] = float(torch.stack(td_losses).mean())
            out["charts/q_values"] = float(torch.stack(q_values).mean())
        return out

    @torch.no_grad()
    def update_target(self) -> None:
        """target <- tau * online + (1 - tau) * target (tau = 1: a copy)."""
        if self.cfg.tau == 1.0:
            self.target.load_state_dict(self.q.state_dict())
            return
        for t, o in zip(self.target.parameters(), self.q.parameters()):
            t.lerp_(o, self.cfg.tau)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "q": self.q.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "counters": {"env_steps": self.env_steps, "grad_steps": self.grad_steps, "grad_credit": self.grad_credit,
                         "learn_from": self.learn_from, "last_target_update": self.last_target_update},
        }
        if self.cfg.save_replay and self.replay is not None:
            state["replay"] = self.replay.state_dict()
        elif self.cfg.save_replay and self.saved_replay is not None:  # restored but not used yet: pass it on
            state["replay"] = self.saved_replay
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q.load_state_dict(state["q"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.param_groups[0]["lr"] = self.cfg.lr  # the config's (e.g. --resume ... --lr), not the saved one
        for k, v in state["counters"].items():
            setattr(self, k, v)
        self.replay = None
        # Kept as is until the first observe: `ponglab eval` loads checkpoints too and needs no memory.
        self.saved_replay = state.get("replay")
        if self.saved_replay is None:  # no replay in the checkpoint: refill a fresh memory before learning again
            self.learn_from = self.env_steps + self.cfg.learning_starts
            self.grad_credit = 0.0


def check_replay_fits(config: DQNConfig, obs_shape: tuple[int, ...], obs_dtype: torch.dtype, frame_stack: int,
                      device: torch.device) -> None:
    """Fail before training, not hours into it, if the replay memory cannot fit, with the options that remain."""
    store = torch.device("cpu") if config.replay_on_host or device.type != "cuda" else device
    need = ReplayMemory.bytes_needed(config.buffer_size, obs_shape, obs_dtype, frame_stack, config.prioritized)
    avail, where = _available_bytes(store)
    if need <= 0.9 * avail:
        return
    fits = int(0.9 * avail / (need / config.buffer_size)) // 10_000 * 10_000
    options = [f"--buffer-size {fits} (about the most that fits now)" if fits >= 10_000 else None,
               "--replay-on-host (keep it in host RAM)" if store.type == "cuda" else None,
               "--device cuda (a GPU with more memory)" if store.type == "cpu" and torch.cuda.is_available() else None,
               "free memory used by other programs"]
    raise ReplayMemoryTooLarge(
        f"buffer_size {config.buffer_size:,} needs {need / 1e9:.1f} GB of replay memory on {where}, but only "
        f"{avail / 1e9:.1f} GB is available (10% kept free). Options: {'; '.join(o for o in options if o)}."
    )


def default_buffer_size(obs_shape: tuple[int, ...], device: torch.device, want: int = 1_000_000) -> int:
    """`want` transitions if they take at most half the free memory of `device`, else the largest multiple of
    100k that does (at least 100k: if even that does not fit, `check_replay_fits` explains it)."""
    per = ReplayMemory.bytes_needed(want, obs_shape, torch.uint8, obs_shape[0]) / want
    avail, _ = _available_bytes(device)
    return int(max(100_000, min(want, 0.5 * avail / per // 100_000 * 100_000)))


# -- registration with the CLI (agents.builders) -------------------------------------------------------------


@dataclass(frozen=True)
class DQNArgs:
    """DQN on Atari or classic control."""

    train: TrainConfig = TrainConfig()
    dqn: DQNConfig = DQNConfig()
    atari: AtariConfig = AtariConfig()
    resume: str | None = None
    """Continue the run in this folder from its latest checkpoint (its saved config is the default; flags override)."""


def dqn_defaults(spec: GameSpec) -> DQNArgs:
    if spec.kind == "classic":
        train = TrainConfig(steps=50_000, num_envs=4, checkpoint_every=25_000)
        return DQNArgs(train=train, dqn=CLASSIC_DQN)
    # 8 envs step in parallel C++ threads; the per-env-step ratios above keep the published schedule.
    shape = (AtariConfig().frame_stack, 84, 84)
    return DQNArgs(dqn=replace(DQNConfig(), buffer_size=default_buffer_size(shape, resolve_device("auto"))))


def build_dqn(spec: GameSpec, args: DQNArgs, env, device: torch.device) -> DQN:
    clip = spec.kind == "atari" and args.atari.clip_rewards
    return DQN(args.dqn, env.single_observation_space, env.single_action_space, env.num_envs, device,
               total_steps=args.train.steps, clip_rewards=clip, seed=args.train.seed)


def register_algos(register) -> None:
    """Called by `agents.builders` at import: adds `dqn` for Atari and classic-control games."""
    from agents.builders import AlgoSpec

    register("dqn", AlgoSpec(
        description="Train DQN. Defaults: the published Atari settings (lr 1e-4, batch 32, a gradient step every 4 "
        "env steps, target copied every 1000, learning from 80k, epsilon 1 -> 0.01 over 10%, 1M replay where it "
        "fits); classic control uses rl-zoo3's CartPole recipe with lr 1e-3 (50k steps, 4 envs).",
        args={"atari": DQNArgs, "classic": DQNArgs},
        defaults=dqn_defaults,
        build=build_dqn,
    ))
