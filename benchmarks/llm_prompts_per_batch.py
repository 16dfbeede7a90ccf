"""What does a batch of 32 prompts x 8 cost to sample, against 16 x 8, late in a run? Measured on a trained policy.

    HF_HUB_OFFLINE=1 python benchmarks/llm_prompts_per_batch.py runs/k1

Late in a run most groups are all-same, and the sampler runs one forward pass per distinct (prompt, tokens so far),
so an all-same group costs one row of each decoding pass. On 2 CPU cores a pass's matrix products cost far less
than in proportion to its rows up to ~128 of them (printed first: the 210 block layers and the LM head of SmolLM2,
row-major as `generate` multiplies them), so twice the prompts should cost much less than twice the sampling.
Then, on the run's checkpoint (its LoRA adapters; the default command's config), the seconds of `LMAgent.act` for
fresh batches of 16, 32 and 64 training prompts x 8, and how many groups came back mixed (the signal). The
training pass is not timed here: the run itself measures it (`benchmarks/RESULTS.md`, thirtieth session).
Last, the same for 16 prompts x 8, 12 and 16 completions and 8 x 16 (what `--grow-group-size` trades on): more
samples of a prompt the policy is sure of cost almost nothing, and find signal in more of the groups.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents.checkpoint import load_checkpoint
from games.text import Arithmetic
from llm_bridge.agent import LMAgent, LMArgs

# SmolLM2-135M's block linears as (in, out): q, k, v, o, gate, up, down; 30 blocks; the tied [576, 49152] head.
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def pass_matmul_seconds(rows: int, repeats: int = 3) -> float:
    """Seconds of one decoding pass's matrix products over `rows` rows (random weights of SmolLM2's shapes)."""
    gen = torch.Generator().manual_seed(0)
    layers = [[torch.randn(i, o, generator=gen) * 0.02 for i, o in SHAPES] for _ in range(30)]
    head = torch.randn(576, 49152, generator=gen) * 0.02
    x, x_mlp = torch.randn(rows, 576, generator=gen), torch.randn(rows, 1536, generator=gen)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for layer in layers:
            for w in layer:
                (x_mlp if w.shape[0] == 1536 else x) @ w
        x @ head
        best = min(best, time.perf_counter() - t)
    return best


def main(run: str) -> None:
    for rows in (16, 32, 64, 128):
        print(f"one decoding pass's matrix products, {rows:3d} rows: {pass_matmul_seconds(rows) * 1e3:6.1f} ms")
    agent = LMAgent(LMArgs().lm, 512, torch.device("cpu"), seed=0)
    agent.load_state_dict(load_checkpoint(Path(run) / "checkpoints" / "latest.pt")["agent"])
    task, rng = Arithmetic(), random.Random(123)
    agent.act([task.sample(rng).prompt for _ in range(8)])  # warm-up (first-call allocations)
    for prompts_per_batch in (16, 32, 64) * 2:
        seconds, right = sample(agent, task, rng, prompts_per_batch, 8)
        mixed = int((right.min(1) != right.max(1)).sum())
        print(f"{prompts_per_batch:2d} prompts x 8: sampled in {seconds:.2f} s ({seconds / prompts_per_batch * 1e3:.0f} ms "
              f"a prompt), {right.mean():.0%} right, {mixed} mixed groups")
    # Larger groups: 8 rounds of each shape, interleaved (the machine's pace drifts), summed.
    shapes = ((16, 8), (16, 12), (16, 16), (8, 16))
    total = {shape: [0.0, 0, 0] for shape in shapes}  # seconds, mixed groups, groups
    for _ in range(8):
        for P, G in shapes:
            agent.cfg = dataclasses.replace(agent.cfg, group_size=G)
            seconds, right = sample(agent, task, rng, P, G)
            total[P, G][0] += seconds
            total[P, G][1] += int((right.min(1) != right.max(1)).sum())
            total[P, G][2] += P
    for (P, G), (seconds, mixed, groups) in total.items():
        print(f"{P:2d} prompts x {G:2d}: {seconds / 8:.2f} s a batch, {mixed}/{groups} groups mixed ({mixed / groups:.0%}), "
              f"{mixed / seconds:.2f} mixed groups and {mixed * G / seconds:.1f} completions with signal a second")


def sample(agent: LMAgent, task: Arithmetic, rng: random.Random, prompts: int, group: int) -> tuple[float, np.ndarray]:
    """Seconds of `LMAgent.act` on `prompts` fresh problems x `group` samples, and which samples were right [P, G]."""
    problems = [task.sample(rng) for _ in range(prompts)]
    t = time.perf_counter()
    texts = agent.act([p.prompt for p in problems for _ in range(group)])  # groups adjacent, as the env lays them out
    seconds = time.perf_counter() - t
    right = np.array([task.score(x, problems[i // group]) for i, x in enumerate(texts)]).reshape(-1, group)
    return seconds, right


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/llm_prompts_per_batch.py RUN_DIR (a run of `ponglab train ppo addition`)")
    main(sys.argv[1])
