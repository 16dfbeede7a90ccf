"""The training half of one LM RL step, shared by the step benchmarks (`bench_llm_update.py`, `bench_llm_vs_rev.py`),
and the trained policy of a run folder, for the benchmarks that measure one (`policy_from_run`).

A surrogate loss (the mean log-prob of the given rows) stands in for the PPO loss: the same forward, backward, clip
and AdamW work, without an advantage to compute.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def train_step(policy, rollout, rows: int, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[float, float]:
    """Forward + backward over the first `rows` completions, clip, AdamW step: (training-pass s, optimizer s)."""
    t0 = time.perf_counter()
    batch = rollout[torch.arange(rows)]
    policy.train()
    stats = policy.evaluate(batch, with_entropy=True)
    loss = -(stats.logprobs * batch.completion_mask).sum() / batch.completion_mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    t1 = time.perf_counter()
    optimizer.step()
    return t1 - t0, time.perf_counter() - t1


def policy_from_run(run: str | Path):
    """SmolLM2 in float32 with the LoRA adapters of a `ponglab train ppo addition` run (its latest checkpoint)."""
    from agents.checkpoint import load_checkpoint
    from llm_bridge import LMPolicy
    from llm_bridge.agent import load_policy

    state = load_checkpoint(Path(run) / "checkpoints" / "latest.pt")["agent"]
    rank = next(int(v.shape[0]) for k, v in state["policy"].items() if k.endswith(".lora_a"))
    policy = LMPolicy.from_name("smollm2", device="cpu", dtype="float32", reference=True, lora_rank=rank)
    load_policy(policy, state)
    return policy
