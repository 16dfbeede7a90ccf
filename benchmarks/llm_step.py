"""The training half of one LM RL step, shared by the step benchmarks (`bench_llm_update.py`, `bench_llm_vs_rev.py`).

A surrogate loss (the mean log-prob of the given rows) stands in for the PPO loss: the same forward, backward, clip
and AdamW work, without an advantage to compute.
"""

from __future__ import annotations

import time

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
