"""PPO training throughput on Pong: ponglab vs Stable-Baselines3, same settings, same machine.

    python benchmarks/bench_ppo.py --steps 20480              # both, 8 envs, 20 updates each
    python benchmarks/bench_ppo.py --only ponglab --device cuda --num-envs 64 --steps 163840

What is compared (the published Atari PPO settings, identical for both):
    Nature CNN with a shared torso, N envs x 128 steps per rollout, 4 epochs of 4 minibatches (batch 256 at
    8 envs), Adam lr 2.5e-4 annealed linearly to 0, eps 1e-5, clip 0.1 (value clipping 0.1 too), entropy 0.01,
    value 0.5, max grad norm 0.5, GAE 0.95, gamma 0.99.
Environments:
    ponglab: `games.make("pong")` = ale-py's C++ `AtariVectorEnv` (N emulators in native threads), with
             `sticky_actions=0.0` to match SB3's env below.
    SB3:     `make_atari_env("PongNoFrameskip-v4", n_envs=N)` + `VecFrameStack(n_stack=4)`: its standard Atari
             setup (rl-zoo3's). v4 = no sticky actions; AtariWrapper does noop-30, frameskip 4 with max-pool,
             fire on reset, 84x84 grayscale, reward clipping, in Python; `DummyVecEnv` steps the N envs one
             after the other in this process (SB3's default for `make_atari_env`).

How it is measured:
    Each framework runs in a fresh process (spawned, so neither warms the other's caches or thread pools), with
    torch's default thread count. Throughput = env steps / seconds between the end of the first update (the
    warm-up: allocator, first backward, env start-up) and the end of the last one; `whole run` includes it.
    Section timers (time.perf_counter around env.step, the acting forward pass, observe/storage and the PPO
    update) split that same window; "other" is the loop itself (bookkeeping, logging). The timers wrap the very
    functions the trainers call, so the breakdown comes from the real training loop, not a replica. On CUDA the
    timers synchronise the device so that queued kernels are charged to the section that launched them.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any, Callable, Literal

import torch
import tyro

NUM_STEPS = 128  # rollout length per env, both frameworks
NUM_MINIBATCHES = 4
SB3_ENV_ID = "PongNoFrameskip-v4"
STICKY_ACTIONS = 0.0  # what SB3's PongNoFrameskip-v4 uses (repeat_action_probability=0.0)


@dataclass(frozen=True)
class BenchArgs:
    """PPO throughput on Pong, ponglab vs Stable-Baselines3."""

    steps: int = 20_480
    """Env steps (summed over envs) for each framework; at least 2 rollouts (2 x num_envs x 128)."""
    num_envs: int = 8
    """Envs stepped together (the minibatch is num_envs x 128 / 4)."""
    device: str = "auto"
    """Training device for both: auto (CUDA when present), cpu, cuda."""
    only: Literal["ponglab", "sb3", "both"] = "both"
    """Which framework(s) to run."""
    repeats: int = 1
    """Runs per framework, alternating ponglab/SB3; the median is reported (VMs are noisy)."""
    threads: int = 0
    """torch.set_num_threads for both (0: torch's default, one per core)."""
    seed: int = 1
    """Seed for both."""
    json_out: str | None = None
    """Also write the results as JSON to this file."""

    def validate(self) -> None:
        rollout = self.num_envs * NUM_STEPS
        if self.num_envs <= 0 or self.repeats <= 0 or self.threads < 0:
            raise SystemExit("error: --num-envs and --repeats must be positive, --threads >= 0.")
        if rollout % NUM_MINIBATCHES:
            raise SystemExit(f"error: --num-envs x {NUM_STEPS} must divide into {NUM_MINIBATCHES} minibatches.")
        if self.steps < 2 * rollout:
            raise SystemExit(f"error: --steps {self.steps} is less than 2 rollouts ({2 * rollout} at "
                             f"{self.num_envs} envs): the first update is a warm-up, so at least two are needed.")


class Sections:
    """Accumulates wall time per named section while `on` (switched on after the warm-up update)."""

    def __init__(self, cuda: bool):
        self.totals: dict[str, float] = defaultdict(float)
        self.on = False
        self.cuda = cuda

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()  # charge earlier queued kernels to whoever launched them
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.totals[name] += time.perf_counter() - t0

        return timed


def _mark(marks: list[tuple[float, float, int]], step: int) -> None:
    """Note (wall time, CPU time of this process summed over its threads, global step)."""
    marks.append((time.perf_counter(), time.process_time(), step))


def _result(name: str, marks: list[tuple[float, float, int]], whole: tuple[float, int], sections: Sections,
            device: str) -> dict[str, Any]:
    """marks: taken at the end of each update; the first one closes the warm-up."""
    (t0, c0, s0), (t1, c1, s1) = marks[0], marks[-1]
    wall = t1 - t0
    parts = dict(sections.totals)
    parts["other"] = max(0.0, wall - sum(parts.values()))
    return {
        "framework": name,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "measured_steps": s1 - s0,
        "measured_seconds": wall,
        "sps": (s1 - s0) / wall,
        # CPU time counts only while this process runs, so it barely moves when other processes compete for
        # the cores (wall time does): a steadier figure of the work per step, whatever the parallelism.
        "steps_per_cpu_second": (s1 - s0) / (c1 - c0),
        "whole_run_sps": whole[1] / whole[0],
        "updates": len(marks),
        "breakdown_s": parts,
    }


def run_ponglab(a: BenchArgs) -> dict[str, Any]:
    """ponglab's own `train` entry point, with timers around the functions its Trainer calls."""
    from agents.builders import PPOArgs
    from agents.cli import train
    from agents.ppo import PPO, PPOConfig
    from agents.trainer import TrainConfig
    from games import AtariConfig
    from games.atari import AtariGame

    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    sections = Sections(cuda)
    marks: list[tuple[float, float, int]] = []
    AtariGame.step = sections.wrap("env.step", AtariGame.step)
    PPO.act = sections.wrap("act (forward)", PPO.act)
    PPO.observe = sections.wrap("observe (storage)", PPO.observe)
    timed_update = sections.wrap("update", PPO.update)

    def update(self, global_step: int, total_steps: int):
        out = timed_update(self, global_step, total_steps)
        _mark(marks, global_step)
        sections.on = True  # from the end of the warm-up update on
        return out

    PPO.update = update
    with tempfile.TemporaryDirectory() as run_dir:
        args = PPOArgs(
            train=TrainConfig(steps=a.steps, num_envs=a.num_envs, seed=a.seed, device=a.device, run_dir=run_dir,
                              eval_episodes=0, progress=False, checkpoint_every=10 * a.steps),
            ppo=PPOConfig(num_steps=NUM_STEPS, num_minibatches=NUM_MINIBATCHES, update_epochs=4, lr=2.5e-4,
                          clip_coef=0.1, ent_coef=0.01, vf_coef=0.5),
            atari=AtariConfig(sticky_actions=STICKY_ACTIONS),
        )
        summary = train("ppo", "pong", args)
    device = "cuda" if cuda else "cpu"
    return _result("ponglab", marks, (summary["wall_seconds"], summary["steps"]), sections, device)


def run_sb3(a: BenchArgs) -> dict[str, Any]:
    """Stable-Baselines3 PPO with its standard Atari setup and the same hyper-parameters."""
    import ale_py
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    sections = Sections(cuda)
    marks: list[tuple[float, float, int]] = []

    class Marks(BaseCallback):
        # SB3 calls _on_rollout_start right after each update (and once before the first rollout).
        def _on_rollout_start(self) -> None:
            if self.model.num_timesteps > 0:
                _mark(marks, self.model.num_timesteps)
                sections.on = True

        def _on_training_end(self) -> None:
            _mark(marks, self.model.num_timesteps)

        def _on_step(self) -> bool:
            return True

    env = VecFrameStack(make_atari_env(SB3_ENV_ID, n_envs=a.num_envs, seed=a.seed), n_stack=4)
    model = PPO(
        "CnnPolicy", env, n_steps=NUM_STEPS, batch_size=a.num_envs * NUM_STEPS // NUM_MINIBATCHES, n_epochs=4,
        learning_rate=lambda progress_remaining: progress_remaining * 2.5e-4,  # linear anneal to 0, like ponglab
        clip_range=0.1, clip_range_vf=0.1, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, gamma=0.99,
        gae_lambda=0.95, seed=a.seed, device=a.device, verbose=0,
    )
    # Instance attributes shadow the methods SB3's collect_rollouts/learn call: model.env.step(...),
    # self.policy(obs) -> policy.forward, self.train().
    model.env.step = sections.wrap("env.step", model.env.step)
    model.policy.forward = sections.wrap("act (forward)", model.policy.forward)
    model.train = sections.wrap("update", model.train)
    start = time.perf_counter()
    model.learn(total_timesteps=a.steps, callback=Marks())
    whole = (time.perf_counter() - start, model.num_timesteps)
    env.close()
    return _result("sb3", marks, whole, sections, str(model.device))


def _measure(fn: Callable[[BenchArgs], dict[str, Any]], a: BenchArgs) -> dict[str, Any]:
    """Runs in a fresh process: set the thread count, run, note how busy the machine was meanwhile."""
    if a.threads:
        torch.set_num_threads(a.threads)
    r = fn(a)
    r["load_avg_1min_after"] = os.getloadavg()[0]  # > cores: other processes competed for the CPU
    return r


def _in_fresh_process(fn: Callable[[BenchArgs], dict[str, Any]], a: BenchArgs) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, fn, a).result()


def _print_result(r: dict[str, Any]) -> None:
    total = r["measured_seconds"]
    parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in r["breakdown_s"].items())
    print(f"  {r['framework']:8s} {r['sps']:7.0f} steps/s  (whole run incl. warm-up {r['whole_run_sps']:.0f}; "
          f"{r['measured_steps']} steps in {total:.1f} s on {r['device']}, {r['torch_threads']} torch threads, "
          f"load avg {r['load_avg_1min_after']:.1f} on {os.cpu_count()} cores)")
    print(f"           {r['steps_per_cpu_second']:.0f} steps per CPU-second; time: {parts}")


def main() -> None:
    a = tyro.cli(BenchArgs)
    a.validate()
    runners = {"ponglab": run_ponglab, "sb3": run_sb3}
    names = list(runners) if a.only == "both" else [a.only]
    print(f"PPO on Pong, {a.num_envs} envs x {NUM_STEPS} steps, {a.steps} steps per run, device {a.device}, "
          f"sticky actions {STICKY_ACTIONS} (SB3 env: {SB3_ENV_ID})", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(a.repeats):
        for n in names:
            r = _in_fresh_process(runners[n], a)
            runs[n].append(r)
            print(f"run {rep + 1}/{a.repeats}:", flush=True)
            _print_result(r)
    median = {n: statistics.median(r["sps"] for r in rs) for n, rs in runs.items()}
    print("\nsteps/s (median over runs, after the warm-up update):")
    for n, v in median.items():
        print(f"  {n:8s} {v:7.0f}")
    if len(median) == 2:
        print(f"  ratio ponglab / sb3 = {median['ponglab'] / median['sb3']:.2f}x")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"args": asdict(a), "median_sps": median, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
