"""Where ponglab's PPO spends its time on Pong, piece by piece, and what a channels-last CNN changes.

    python benchmarks/profile_ppo.py                      # env step, act, update; current vs channels-last CNN
    python benchmarks/profile_ppo.py --threads 1 --torch-profile

`bench_ppo.py` times whole training runs; this script times the three pieces of one PPO iteration in
isolation, so that a change to one of them can be measured without the noise of the others:

    env.step   one step of N Pong emulators: ponglab's C++ `AtariVectorEnv` vs SB3's Python wrapper stack
    act        `PPO.act` on N observations (the forward pass that picks actions)
    update     one full `PPO.update` (4 epochs x 4 minibatches) on a rollout of N x 128 random frames

Each piece is repeated and the *minimum* is kept (timeit's rule: noise only ever adds time), in wall time and
in CPU time of this process (CPU time barely moves when other processes compete for the cores).
The "channels-last" variant patches `NatureCNN` in this process only (no file is edited): NHWC conv weights
and one uint8 -> float32 NHWC copy scaled in place, instead of NCHW weights and `obs.float() / 255.0`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import tyro

from agents.common import Transition
from agents.networks import NatureCNN
from agents.ppo import PPO, PPOConfig

MINIBATCHES = PPOConfig().update_epochs * PPOConfig().num_minibatches  # gradient steps per update (16)


@dataclass(frozen=True)
class ProfileArgs:
    """Time env.step, act and update of ponglab's PPO on Pong."""

    num_envs: int = 8
    """Envs stepped together."""
    threads: int = 0
    """torch.set_num_threads (0: torch's default, one per core)."""
    repeats: int = 3
    """Timed repetitions of each piece; the minimum is reported."""
    sb3_env: bool = True
    """Also time SB3's env stack (make_atari_env + VecFrameStack), if stable-baselines3 is installed."""
    torch_profile: bool = False
    """Print torch.profiler's top operators of one update, for each CNN variant."""


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Minimum (wall seconds, CPU seconds) of `fn()` over `repeats` calls."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def channels_last_cnn() -> Callable[[], None]:
    """Patch NatureCNN to run in channels-last; returns a function that undoes the patch."""
    orig_init, orig_forward = NatureCNN.__init__, NatureCNN.forward

    def __init__(self, in_channels: int, out_dim: int = 512):
        orig_init(self, in_channels, out_dim)
        self.to(memory_format=torch.channels_last)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.to(torch.float32, memory_format=torch.channels_last, copy=True).mul_(1 / 255.0))

    NatureCNN.__init__, NatureCNN.forward = __init__, forward

    def undo() -> None:
        NatureCNN.__init__, NatureCNN.forward = orig_init, orig_forward

    return undo


def time_env_steps(step: Callable[[np.ndarray], object], num_envs: int, repeats: int, n: int = 50) -> tuple[float, float]:
    """Seconds per vector step (wall, CPU), random Pong actions."""
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 6, num_envs) for _ in range(n)]
    step(actions[0])  # warm-up

    def run() -> None:
        for a in actions:
            step(a)

    wall, cpu = best_of(run, repeats)
    return wall / n, cpu / n


def time_agent(a: ProfileArgs, obs: np.ndarray, torch_profile: bool) -> dict[str, tuple[float, float]]:
    """act (per call) and update (per rollout) of a fresh PPO agent on random frames."""
    import gymnasium as gym

    torch.manual_seed(0)
    agent = PPO(PPOConfig(), gym.spaces.Box(0, 255, obs.shape[1:], np.uint8), gym.spaces.Discrete(6), a.num_envs,
                torch.device("cpu"))
    rng = np.random.default_rng(0)
    no_end = np.zeros(a.num_envs, dtype=bool)

    def rollout() -> None:
        for _ in range(agent.cfg.num_steps):
            action = agent.act(obs)
            reward = rng.standard_normal(a.num_envs).astype(np.float32)
            agent.observe(Transition(obs, action, reward, no_end, no_end, obs, obs, {}))

    rollout()
    agent.update(1, 10**9)  # warm-up: allocator, first backward
    act = best_of(lambda: agent.act(obs), 10 * a.repeats)
    wall, cpu = float("inf"), float("inf")
    for _ in range(a.repeats):  # time the update only, each on a freshly collected rollout
        rollout()
        w, c = best_of(lambda: agent.update(1, 10**9), 1)
        wall, cpu = min(wall, w), min(cpu, c)
    if torch_profile:
        from torch.profiler import ProfilerActivity, profile

        rollout()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            agent.update(1, 10**9)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=36))
    return {"act": act, "update": (wall, cpu)}


def main() -> None:
    a = tyro.cli(ProfileArgs)
    if a.num_envs <= 0 or a.repeats <= 0 or a.threads < 0:
        raise SystemExit("error: --num-envs and --repeats must be positive, --threads >= 0.")
    if a.threads:
        torch.set_num_threads(a.threads)
    from games import AtariConfig
    from games.atari import AtariGame

    print(f"{a.num_envs} envs, {torch.get_num_threads()} torch threads; min over {a.repeats} repeats; "
          f"ms = wall (CPU time of this process)")
    env = AtariGame("pong", a.num_envs, seed=0, config=AtariConfig(sticky_actions=0.0))
    obs, _ = env.reset()
    w, c = time_env_steps(env.step, a.num_envs, a.repeats)
    print(f"  env.step   ponglab AtariVectorEnv       {1e3 * w:7.2f} ms ({1e3 * c:.2f})  = {a.num_envs / w:.0f} steps/s")
    env.close()
    if a.sb3_env:
        try:
            import ale_py
            import gymnasium as gym
            from stable_baselines3.common.env_util import make_atari_env
            from stable_baselines3.common.vec_env import VecFrameStack
        except ImportError as e:
            print(f"  env.step   SB3: skipped ({e}); pip install stable-baselines3 opencv-python-headless")
        else:
            gym.register_envs(ale_py)
            sb3 = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=a.num_envs, seed=0), n_stack=4)
            sb3.reset()
            w, c = time_env_steps(sb3.step, a.num_envs, a.repeats)
            print(f"  env.step   SB3 DummyVecEnv + wrappers    {1e3 * w:7.2f} ms ({1e3 * c:.2f})  = "
                  f"{a.num_envs / w:.0f} steps/s")
            sb3.close()
    results = {}
    for variant in ("current CNN", "channels-last CNN"):
        undo = channels_last_cnn() if variant == "channels-last CNN" else (lambda: None)
        try:
            results[variant] = r = time_agent(a, obs, a.torch_profile)
        finally:
            undo()
        (aw, ac), (uw, uc) = r["act"], r["update"]
        print(f"  {variant:18s} act {1e3 * aw:6.2f} ms ({1e3 * ac:.2f}) | update {uw:6.2f} s ({uc:.2f}) "
              f"= {1e3 * uw / MINIBATCHES:.0f} ms per minibatch")
    cur, cl = results["current CNN"]["update"], results["channels-last CNN"]["update"]
    print(f"  channels-last update speed-up: {cur[0] / cl[0]:.2f}x wall, {cur[1] / cl[1]:.2f}x CPU")


if __name__ == "__main__":
    main()
