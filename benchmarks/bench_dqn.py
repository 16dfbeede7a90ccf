"""Training throughput of ponglab's DQN vs Stable-Baselines3's DQN on Pong, same settings, same wall-clock budget.

Both learn during the measurement (learning_starts is small), with the same network (Nature CNN + linear
Q head), batch 32, one gradient step per 4 env steps, target copied every 1000 steps, Huber loss, Adam,
gradient norm clipped at 10, a replay of 100k transitions, and the same Atari preprocessing (ALE v5 sticky
actions 0.25, frameskip 4 with max-pooling, 84x84 grayscale, 4-frame stack, up to 30 no-ops, FIRE on
reset, clipped rewards). ponglab runs through its real trainer (`agents.trainer.Trainer`, stopped by the
same Ctrl-C path a user would use when the budget is spent); SB3 through `DQN.learn` with a callback that
stops it when the budget is spent. Steps/s = env steps (agent decisions) per second of training.

    python benchmarks/bench_dqn.py                       # CPU, 60 s each, 1 env
    python benchmarks/bench_dqn.py --device cuda --seconds 120 --num-envs 1

Needs `pip install stable-baselines3 --no-deps` (it must not upgrade torch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time

import torch

BUFFER, BATCH, TRAIN_FREQ, TARGET, LR = 100_000, 32, 4, 1000, 1e-4


def bench_ponglab(seconds: float, device: str, num_envs: int, learning_starts: int, seed: int) -> dict:
    from agents.builders import build_agent, make_env_fn
    from agents.common import resolve_device, seed_everything
    from agents.dqn import DQNArgs, DQNConfig
    from agents.trainer import TrainConfig, Trainer
    from games import AtariConfig, resolve

    spec = resolve("pong")
    args = DQNArgs(
        train=TrainConfig(steps=10_000_000, num_envs=num_envs, seed=seed, device=device, eval_episodes=0,
                          checkpoint_every=10_000_000, progress=False),
        dqn=DQNConfig(lr=LR, buffer_size=BUFFER, batch_size=BATCH, train_freq=TRAIN_FREQ, target_update=TARGET,
                      learning_starts=learning_starts),
        atari=AtariConfig(),
    )
    seed_everything(seed)
    env = make_env_fn(spec, args)(num_envs, seed)
    agent = build_agent("dqn", spec, args, env, resolve_device(device))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(agent, env, args.train, run_dir, algo="dqn", game="pong")

        def stop(*_):  # the budget is spent: the same path as a user's Ctrl-C (checkpoint + summary)
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            trainer.run()
        except KeyboardInterrupt:
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        summary = json.loads((trainer.run_dir / "summary.json").read_text())
    env.close()
    return {"steps": summary["steps"], "seconds": summary["wall_seconds"], "sps": summary["sps"],
            "gradient_steps": agent.grad_steps}


def bench_sb3(seconds: float, device: str, num_envs: int, learning_starts: int, seed: int) -> dict:
    import ale_py
    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.atari_wrappers import AtariWrapper
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack

    gym.register_envs(ale_py)

    def make_one():
        # frameskip=1 in ALE: AtariWrapper skips 4 frames with max-pooling; sticky actions at the emulator, as ours.
        env = gym.make("ALE/Pong-v5", frameskip=1, repeat_action_probability=0.25, full_action_space=False)
        return AtariWrapper(env, noop_max=30, frame_skip=4, screen_size=84, terminal_on_life_loss=False,
                            clip_reward=True)

    venv = VecFrameStack(DummyVecEnv([make_one] * num_envs), n_stack=4)

    class Budget(BaseCallback):
        def _on_training_start(self) -> None:
            self.t0 = time.time()

        def _on_step(self) -> bool:
            return time.time() - self.t0 < seconds

    model = DQN(
        "CnnPolicy", venv, learning_rate=LR, buffer_size=BUFFER, learning_starts=learning_starts,
        batch_size=BATCH, gamma=0.99, train_freq=TRAIN_FREQ, gradient_steps=1, target_update_interval=TARGET,
        exploration_fraction=0.1, exploration_final_eps=0.01, max_grad_norm=10, optimize_memory_usage=False,
        device=device, seed=seed, verbose=0,
    )
    cb = Budget()
    model.learn(total_timesteps=10_000_000, callback=cb)
    wall = time.time() - cb.t0  # from the start of training, like the trainer's wall_seconds
    venv.close()
    return {"steps": model.num_timesteps, "seconds": wall, "sps": model.num_timesteps / wall,
            "gradient_steps": model._n_updates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="wall-clock budget of each library, per round")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--num-envs", type=int, default=1, help="envs of each library (SB3: DummyVecEnv)")
    p.add_argument("--learning-starts", type=int, default=1000, help="random steps before learning, both")
    p.add_argument("--rounds", type=int, default=1, help="rounds; the order of the two libraries alternates")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for both (0: torch's default)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"DQN on Pong, {a.seconds:.0f} s each, device {a.device}, {a.num_envs} env(s), batch {BATCH}, "
          f"train_freq {TRAIN_FREQ}, buffer {BUFFER:,}, learning_starts {a.learning_starts}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    sps: dict[str, list[float]] = {"ponglab": [], "sb3": []}
    runs = (("ponglab", bench_ponglab), ("sb3", bench_sb3))
    for k in range(a.rounds):
        for name, fn in (runs if k % 2 == 0 else runs[::-1]):
            r = fn(a.seconds, a.device, a.num_envs, a.learning_starts, a.seed)
            sps[name].append(r["sps"])
            print(f"round {k + 1} {name:8s} {r['sps']:8.1f} steps/s  ({r['steps']} env steps, "
                  f"{r['gradient_steps']} gradient steps in {r['seconds']:.1f} s)", flush=True)
    mean = {name: sum(v) / len(v) for name, v in sps.items()}
    print(f"mean steps/s: ponglab {mean['ponglab']:.1f}, sb3 {mean['sb3']:.1f}; "
          f"ratio ponglab / sb3: {mean['ponglab'] / mean['sb3']:.2f}x (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
