"""Replay memory benchmark: ponglab's ReplayMemory vs Stable-Baselines3's ReplayBuffer on Atari shapes.

Measures, in one run on one machine:
  1. bytes per stored Atari transition (obs [4, 84, 84] uint8 frame stacks), from the nbytes of the
     arrays each buffer allocates for --buffer-size transitions, and that figure x 1M;
  2. sampling throughput: batches per second delivered on --device as float tensors ready for the
     network (obs and next_obs as float/255). ponglab: sample() + .float()/255 (stacks rebuilt from
     single frames, validity and n-step returns included); SB3: buffer.sample() + .float()/255.

Both buffers are filled with the same synthetic stream (random frames shifted into 4-frame stacks,
~1% episode ends per step); contents do not change the speed of either buffer.

    python benchmarks/bench_replay.py --device cpu --buffer-size 50000
    python benchmarks/bench_replay.py --device cuda --buffer-size 1000000   # on a GPU machine
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from agents.replay import ReplayMemory

OBS = (4, 84, 84)


def stream(num_envs: int, steps: int, seed: int = 0):
    """Yield (obs, actions, rewards, terminated, truncated, next_obs, final_obs) like AtariVectorEnv
    with autoreset_mode='SameStep' (zero-padded stacks after reset)."""
    rng = np.random.default_rng(seed)
    obs = np.zeros((num_envs, *OBS), np.uint8)
    obs[:, -1] = rng.integers(0, 256, (num_envs, 84, 84), dtype=np.uint8)
    for _ in range(steps):
        nxt = np.concatenate([obs[:, 1:], rng.integers(0, 256, (num_envs, 1, 84, 84), dtype=np.uint8)], 1)
        term, trunc = rng.random(num_envs) < 0.007, rng.random(num_envs) < 0.003
        trunc &= ~term
        final = nxt.copy()
        done = term | trunc
        nxt[done] = 0
        nxt[done, -1] = rng.integers(0, 256, (int(done.sum()), 84, 84), dtype=np.uint8)
        yield (obs, rng.integers(0, 6, num_envs), rng.choice([-1.0, 0.0, 1.0], num_envs).astype(np.float32),
               term, trunc, nxt, final)
        obs = nxt


def ponglab_bytes(mem: ReplayMemory) -> int:
    per_slot = [getattr(mem, k) for k in mem._TENSORS if k not in ("head", "count", "next_first", "max_prio")]
    return sum(t.nbytes for t in per_slot if t is not None) + sum(t.nbytes for t in mem.tree.levels)


def sb3_bytes(buf) -> int:
    arrays = [buf.observations, buf.actions, buf.rewards, buf.dones, buf.timeouts]
    if not buf.optimize_memory_usage:
        arrays.append(buf.next_observations)
    return sum(a.nbytes for a in arrays)


def rate(sample_fn, device: torch.device, seconds: float) -> float:
    """Batches per second of sample_fn (which returns the float tensors), after a warm-up."""
    for _ in range(5):
        sample_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            out = sample_fn()
        n += 10
        if device.type == "cuda":
            torch.cuda.synchronize()
    _ = out
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--buffer-size", type=int, default=50_000, help="transitions per buffer")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per (buffer, batch size), all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the best is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--pin-memory", action="store_true", help="ponglab storage in host RAM, batches to device")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gymnasium import spaces
    from stable_baselines3 import __version__ as sb3_version
    from stable_baselines3.common.buffers import ReplayBuffer

    device, N, size = torch.device(args.device), args.num_envs, args.buffer_size
    steps = size // N + 100  # fill every buffer completely (and wrap around a little)
    obs_space, act_space = spaces.Box(0, 255, OBS, np.uint8), spaces.Discrete(6)
    buffers = {
        "ponglab (uniform, n=1)": ReplayMemory(size, N, OBS, torch.uint8, 4, n_step=1, device=device,
                                               pin_memory=args.pin_memory, seed=0),
        "ponglab (PER, n=3)": ReplayMemory(size, N, OBS, torch.uint8, 4, n_step=3, prioritized=True,
                                           device=device, pin_memory=args.pin_memory, seed=0),
        "SB3 ReplayBuffer": ReplayBuffer(size, obs_space, act_space, device, n_envs=N),
        "SB3 optimize_memory_usage": ReplayBuffer(size, obs_space, act_space, device, n_envs=N,
                                                  optimize_memory_usage=True, handle_timeout_termination=False),
    }
    t0 = time.perf_counter()
    for obs, act, rew, term, trunc, nxt, final in stream(N, steps):
        infos = [{"TimeLimit.truncated": bool(t)} for t in trunc]
        for buf in buffers.values():
            if isinstance(buf, ReplayMemory):
                buf.add(obs, act, rew, term, trunc, final)
            else:  # SB3 stores next_obs itself: the true final obs at episode ends
                next_for_sb3 = np.where((term | trunc)[:, None, None, None], final, nxt)
                buf.add(obs, next_for_sb3, act, rew, (term | trunc).astype(np.float32), infos)
    print(f"filled 4 buffers with {steps} steps x {N} envs in {time.perf_counter() - t0:.0f} s")

    def sampler(buf, B, to_float):
        """One batch from buf; to_float: also obs/next_obs as float/255, what the network consumes."""
        if isinstance(buf, ReplayMemory):
            def f():
                b = buf.sample(B)
                return (b.obs.float() / 255, b.next_obs.float() / 255) if to_float else b
        else:
            def f():
                s = buf.sample(B)
                return (s.observations.float() / 255, s.next_observations.float() / 255) if to_float else s
        return f

    # Rounds interleave the buffers so that a load change on the machine hits all of them; best of rounds.
    cells = [(name, B, fl) for fl in (True, False) for name in buffers for B in (32, 256)]
    best = dict.fromkeys(cells, 0.0)
    order = np.random.default_rng(0)
    for _ in range(args.rounds):
        for i in order.permutation(len(cells)):  # shuffled: no buffer always runs first or last
            name, B, fl = cells[i]
            best[name, B, fl] = max(best[name, B, fl],
                                    rate(sampler(buffers[name], B, fl), device, args.seconds / args.rounds))
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({cpu}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} torch threads)"
    print(f"\ndevice: {dev}; torch {torch.__version__}; stable-baselines3 {sb3_version}; buffer {size:,} "
          f"transitions, {N} envs; obs {OBS} uint8; best of {args.rounds} rounds, {args.seconds:.0f} s per cell"
          + ("; ponglab storage: pinned host RAM" if args.pin_memory else ""))
    ref = "SB3 ReplayBuffer"
    mem_bytes = {n: (ponglab_bytes(b) if isinstance(b, ReplayMemory) else sb3_bytes(b)) / size
                 for n, b in buffers.items()}
    for fl in (True, False):
        what = "float obs+next_obs on device" if fl else "sample() only, no float conversion"
        print(f"\n| buffer | bytes/transition | GB for 1M | x SB3 memory | batches/s B=32 ({what}) | x SB3 "
              f"| batches/s B=256 | x SB3 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in buffers:
            per, r32, r256 = mem_bytes[name], best[name, 32, fl], best[name, 256, fl]
            print(f"| {name} | {per:,.0f} | {per * 1e6 / 1e9:.2f} | {per / mem_bytes[ref]:.3f} | {r32:,.0f} "
                  f"| {r32 / best[ref, 32, fl]:.2f} | {r256:,.0f} | {r256 / best[ref, 256, fl]:.2f} |")


if __name__ == "__main__":
    main()
