"""Mixed precision (bfloat16 autocast) against float32 for the default command's loop on this CPU, side by side.

    HF_HUB_OFFLINE=1 python benchmarks/llm_dtype.py runs/s1 --batches 12

`--dtype auto` picks mixed precision on a CPU with AVX512-BF16 or AMX (`llm_bridge.policy.cpu_has_bf16`) on the
grounds that bfloat16 matrix products are native there. The sampler's and the training pass's speed-ups since
(row-major weights, the LoRA merge from a kept W^T, shared nodes and stems) were tuned in float32, so whether
mixed still pays is a measurement, not a given. Two agents with the default command's config, one per precision,
both loaded from the run's latest checkpoint, each with its own `addition` env (same seed), take turns batch by
batch (who goes first alternates, because this machine's pace drifts from minute to minute): sample 16 prompts
x 8 (`act`), score, `observe`, and `update` once the update's rows are in, as `agents.trainer.Trainer` does.
Printed: seconds per batch of each, the median of the paired per-batch ratios, and each one's share of right
answers (different samplers of the same policy, so the last should agree within noise).

A third agent, "recast", is mixed precision as it ran until the thirty-third session: the frozen float32 weights
(the LoRA base in the training pass, the merged sampling weights, the row-major head) left for autocast to cast
to bfloat16 on every call, where "mixed" keeps bfloat16 copies (`lora.LoRALinear.forward`,
`lora.merged_adapters`, `LMPolicy._row_major_head`). Same numbers bit for bit (tested), so the difference is the
cost of the casts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from agents.builders import build_agent, make_env_fn
from agents.checkpoint import load_checkpoint
from agents.common import Transition
from games import resolve
from llm_bridge import policy as policy_module
from llm_bridge.agent import LMAgent, LMArgs
from llm_bridge.lora import LoRALinear
from llm_bridge.policy import LMPolicy, cpu_has_bf16


@contextlib.contextmanager
def recasting():
    """Mixed precision with the frozen weights kept in float32 only, so autocast casts them on every call."""
    merge, head, forward = policy_module.merged_adapters, LMPolicy._row_major_head, LoRALinear.forward

    def forward_f32(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None and not torch.is_grad_enabled():
            return torch.nn.functional.linear(x, self.merged, self.base.bias)
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
        return self.base(x) + update * self.scale

    policy_module.merged_adapters = lambda model, dtype=None: merge(model)
    LMPolicy._row_major_head = lambda self, dtype=None: head(self)
    LoRALinear.forward = forward_f32
    try:
        yield
    finally:
        policy_module.merged_adapters, LMPolicy._row_major_head, LoRALinear.forward = merge, head, forward


def build(args: LMArgs, dtype: str, state: dict) -> tuple[LMAgent, object]:
    """The env and agent `ponglab train ppo addition` builds (`agents.builders`), at `dtype`, with the run's weights."""
    spec, args = resolve("addition"), dataclasses.replace(args, lm=dataclasses.replace(args.lm, dtype=dtype))
    env = make_env_fn(spec, args)(args.train.num_envs, 1)
    agent = build_agent("ppo", spec, args, env, torch.device("cpu"))
    agent.load_state_dict(state)
    return agent, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder of `ponglab train ppo addition` (its latest checkpoint is loaded)")
    ap.add_argument("--batches", type=int, default=12, help="measured batches per precision (after one warm-up)")
    opts = ap.parse_args()
    print(f"AVX512-BF16 or AMX on this CPU: {cpu_has_bf16()}; torch threads: {torch.get_num_threads()}")
    state = load_checkpoint(Path(opts.run) / "checkpoints" / "latest.pt")["agent"]
    args = LMArgs()
    runners = {}
    for name, dtype in (("mixed", "mixed"), ("float32", "float32"), ("recast", "mixed")):
        agent, env = build(args, dtype, state)
        obs, _ = env.reset(seed=1)
        runners[name] = {"agent": agent, "env": env, "obs": obs, "seconds": [], "right": [], "updates": 0,
                         "patch": recasting if name == "recast" else contextlib.nullcontext}

    def batch(r: dict) -> float:
        with r["patch"]():
            return timed_batch(r)

    def timed_batch(r: dict) -> float:
        t = time.perf_counter()
        action = r["agent"].act(r["obs"])
        next_obs, reward, term, trunc, info = r["env"].step(action)
        r["agent"].observe(Transition(r["obs"], action, reward, term, trunc, next_obs, next_obs, info))
        r["obs"] = next_obs
        r["right"].append(float(np.mean(info["episode"]["r"] >= 1.0)))
        if r["agent"].ready():
            r["agent"].update(0, 10**9)
            r["updates"] += 1
        return time.perf_counter() - t

    for name in runners:  # warm-up: first-call allocations
        batch(runners[name])
    order = list(runners)
    for i in range(opts.batches):
        for name in order if i % 2 == 0 else order[::-1]:
            runners[name]["seconds"].append(batch(runners[name]))
        print(f"batch {i + 1:2d}: " + ", ".join(f"{n} {r['seconds'][-1]:5.2f} s" for n, r in runners.items()))
    for name, r in runners.items():
        print(f"{name:8s}: {statistics.median(r['seconds']):.2f} s a batch (median; mean {statistics.mean(r['seconds']):.2f}), "
              f"{r['updates']} updates, {statistics.mean(r['right']):.1%} right")
    for other in ("float32", "recast"):
        ratios = [o / m for m, o in zip(runners["mixed"]["seconds"], runners[other]["seconds"])]
        print(f"{other} / mixed seconds a batch, median over {len(ratios)} pairs: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
