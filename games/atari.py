"""Atari games, stepped in batches by ale-py's C++ vector environment.

`AtariVectorEnv` runs N emulators in native threads and applies the DQN-paper preprocessing in C++:
84x84 grayscale, frameskip 4 with max-pooling of the last two frames, a 4-frame stack, up to 30 no-op
starts and FIRE on reset for games that need it. We add two things on top:

* **Raw scores for logging, clipped rewards for learning.** The C++ env is asked for *unclipped* rewards;
  we clip with `sign(r)` here and keep a running sum of the raw reward per env, so that
  `info["episode"]["r"]` is the real game score (Pong: -21..21) whatever the learner sees.
* **Same-step autoreset.** When an episode ends at step t, the observation returned for step t is already
  the first observation of the next episode and the true last observation is in `info["final_obs"]`.
  The transition (s_t, a_t, r_t, final_obs) is therefore never mixed with the first frame of the next
  episode (Gymnasium 1.x's default "next-step" mode would instead return one extra dummy step).

Defaults follow Machado et al. (2018) / ALE v5: sticky actions with probability 0.25, the minimal action
set, and episodes truncated at 108,000 frames (30 minutes of play). Set `sticky_actions=0.0` for the
deterministic "NoFrameskip-v4" setting that CleanRL's Atari scripts use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AtariConfig:
    """Preprocessing of Atari games (ignored by other games)."""

    sticky_actions: float = 0.25
    """Probability that the emulator repeats the previous action instead of the new one (ALE v5: 0.25; 0 = deterministic)."""
    frameskip: int = 4
    """Emulator frames per agent step; the last two are max-pooled."""
    frame_stack: int = 4
    """Number of consecutive 84x84 frames in one observation."""
    noop_max: int = 30
    """Up to this many no-op actions at the start of each episode, for varied starts."""
    clip_rewards: bool = True
    """Clip the learning reward to {-1, 0, +1}. Logged episodic returns are always the raw game score."""
    max_episode_frames: int = 108_000
    """Truncate episodes after this many emulator frames (ALE v5: 108,000 = 30 minutes)."""
    full_action_space: bool = False
    """Use all 18 joystick actions instead of the game's minimal set."""


def rom_ids() -> list[str]:
    """Snake-case names of every ROM shipped with ale-py (`pong`, `space_invaders`, ...)."""
    from ale_py import roms

    return sorted(roms.get_all_rom_ids())


class AtariGame:
    """N Atari emulators stepped together. Observations are uint8 `[N, stack, 84, 84]`."""

    def __init__(self, rom: str, num_envs: int, seed: int = 0, config: AtariConfig = AtariConfig()):
        from ale_py.vector_env import AtariVectorEnv

        self.game = rom
        self.num_envs = num_envs
        self.config = config
        self._seed = seed
        self.env = AtariVectorEnv(
            rom,
            num_envs,
            autoreset_mode="SameStep",
            reward_clipping=False,  # we clip ourselves so that raw scores stay visible
            repeat_action_probability=config.sticky_actions,
            frameskip=config.frameskip,
            stack_num=config.frame_stack,
            noop_max=config.noop_max,
            max_num_frames_per_episode=config.max_episode_frames,
            full_action_space=config.full_action_space,
            use_fire_reset=True,
        )
        self.single_observation_space = self.env.single_observation_space
        self.single_action_space = self.env.single_action_space
        self._returns = np.zeros(num_envs, dtype=np.float64)  # raw score of the running episode
        self._lengths = np.zeros(num_envs, dtype=np.int64)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict]:
        obs, info = self.env.reset(seed=self._seed if seed is None else seed)
        self._returns[:] = 0
        self._lengths[:] = 0
        return obs, info

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, raw_reward, terminated, truncated, info = self.env.step(np.asarray(actions, dtype=np.int64))
        self._returns += raw_reward
        self._lengths += 1
        done = terminated | truncated
        info = dict(info)
        info["raw_reward"] = raw_reward.astype(np.float32)
        if done.any():  # a dense [N, ...] array: the true last observation where done, else `obs`
            mask = done.reshape(-1, *([1] * (obs.ndim - 1)))
            info["final_obs"] = np.where(mask, info["final_obs"], obs)
        else:
            info["final_obs"] = obs
        info["episode"] = {"r": self._returns.copy(), "l": self._lengths.copy()}
        info["_episode"] = done
        self._returns[done] = 0
        self._lengths[done] = 0
        reward = np.sign(raw_reward) if self.config.clip_rewards else raw_reward
        return obs, reward.astype(np.float32), terminated, truncated, info

    def frame(self, obs: np.ndarray, i: int = 0) -> np.ndarray:
        """An RGB picture of what env `i`'s agent sees: its newest 84x84 frame, enlarged 4x. `[336, 336, 3]`."""
        gray = obs[i, -1].repeat(4, axis=0).repeat(4, axis=1)
        return np.stack([gray] * 3, axis=-1)

    def close(self) -> None:
        self.env.close()
