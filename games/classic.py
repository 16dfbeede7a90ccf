"""Gymnasium's classic-control games (CartPole, Acrobot, MountainCar) through its vector API.

The same contract as `games.atari.AtariGame`: same-step autoreset, a dense `info["final_obs"]`, and
`info["episode"]` / `info["_episode"]` with the raw return of every episode that ended this step.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

# short name -> gymnasium id. Only games with a discrete action space: both agents act discretely.
CLASSIC_GAMES = {
    "cartpole": "CartPole-v1",
    "acrobot": "Acrobot-v1",
    "mountaincar": "MountainCar-v0",
}


class ClassicGame:
    """N copies of a classic-control game. Observations are float32 `[N, obs_dim]`."""

    def __init__(self, env_id: str, num_envs: int, seed: int = 0, render: bool = False):
        self.game = env_id
        self.num_envs = num_envs
        self._seed = seed
        self.env = gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",  # these games step in microseconds: threads would cost more than they save
            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
            render_mode="rgb_array" if render else None,
        )
        self.single_observation_space = self.env.single_observation_space
        self.single_action_space = self.env.single_action_space
        self._returns = np.zeros(num_envs, dtype=np.float64)
        self._lengths = np.zeros(num_envs, dtype=np.int64)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict]:
        obs, info = self.env.reset(seed=self._seed if seed is None else seed)
        self._returns[:] = 0
        self._lengths[:] = 0
        return obs.astype(np.float32), info

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(actions))
        obs = obs.astype(np.float32)
        self._returns += reward
        self._lengths += 1
        done = terminated | truncated
        final_obs = obs.copy()
        if done.any():  # gymnasium gives an object array with None where not done: make it dense
            for i in np.flatnonzero(done):
                final_obs[i] = info["final_obs"][i]
        out = {
            "raw_reward": reward.astype(np.float32),
            "final_obs": final_obs,
            "episode": {"r": self._returns.copy(), "l": self._lengths.copy()},
            "_episode": done,
        }
        self._returns[done] = 0
        self._lengths[done] = 0
        return obs, reward.astype(np.float32), terminated, truncated, out

    def frame(self, obs: np.ndarray, i: int = 0) -> np.ndarray:
        """An RGB picture of env `i` (needs `render=True`)."""
        return self.env.render()[i]

    def close(self) -> None:
        self.env.close()
