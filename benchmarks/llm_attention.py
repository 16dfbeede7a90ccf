"""SDPA against `llm_bridge.attention` (grouped-query attention written out in float32) on this CPU, side by side.

    HF_HUB_OFFLINE=1 python benchmarks/llm_attention.py              # SmolLM2 as loaded: an early-run batch
    HF_HUB_OFFLINE=1 python benchmarks/llm_attention.py runs/t1      # a run's latest checkpoint: a late-run batch

The agent and env the default command builds (`--model smollm2`, `--dtype auto`, rank-16 adapters), its
attention switched between the two implementations batch by batch (who goes first alternates, since this
machine's pace drifts). Each round times, per implementation,
  * `generate`: 16 prompts x 8 samples of 2-digit addition, as the default command samples them;
  * the training pass: `evaluate` with gradients and its backward over the first `--rows` completions of the
    round's batch (the update trains the informative rows only: ~60-90 early in a run, ~8-30 late).
Printed: the median seconds of each and the median of the paired ratios (SDPA / ours).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from agents.builders import build_agent, make_env_fn
from agents.checkpoint import load_checkpoint
from games import resolve
from llm_bridge.agent import LMArgs
from llm_bridge.attention import NAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a run folder of `ponglab train ppo addition` (default: no training)")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds (after one warm-up)")
    ap.add_argument("--rows", type=int, default=0, help="completions in the training pass (default: 80, or 24 "
                                                        "with a run)")
    opts = ap.parse_args()
    rows = opts.rows or (24 if opts.run else 80)
    torch.manual_seed(0)
    # The env and agent `ponglab train ppo addition` builds (agents.builders), with the run's weights if given.
    spec, args = resolve("addition"), LMArgs()
    env = make_env_fn(spec, args)(args.train.num_envs, 1)
    agent = build_agent("ppo", spec, args, env, torch.device("cpu"))
    if opts.run:
        agent.load_state_dict(load_checkpoint(Path(opts.run) / "checkpoints" / "latest.pt")["agent"])
    policy = agent.policy
    print(f"torch threads: {torch.get_num_threads()}, autocast: {policy.autocast_dtype}, "
          f"checkpoint: {opts.run or 'none'}, training rows: {rows}")
    seconds: dict[str, list[float]] = {}
    obs, _ = env.reset(seed=1)
    for i in range(opts.rounds + 1):
        for impl in ("sdpa", NAME) if i % 2 else (NAME, "sdpa"):
            policy.model.set_attn_implementation(impl)
            t = time.perf_counter()
            action = agent.act(obs)  # sample 16 prompts x 8, as the default command does (stops at the answer)
            t_gen = time.perf_counter() - t
            batch = agent.rollout[0:rows]
            policy.train()
            t = time.perf_counter()
            stats = policy.evaluate(batch, with_entropy=True, entropy_grad=False)
            (-(stats.logprobs * batch.completion_mask).sum()).backward()
            t_train = time.perf_counter() - t
            policy.zero_grad(set_to_none=True)
            if i:  # round 0 warms up
                seconds.setdefault(f"generate {impl}", []).append(t_gen)
                seconds.setdefault(f"train {impl}", []).append(t_train)
        obs, *_ = env.step(action)  # the next round's prompts (no update: the weights stay as loaded)
        if i:
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    for k, v in seconds.items():
        print(f"{k:22s}: {statistics.median(v):.3f} s (median of {len(v)})")
    for part in ("generate", "train"):
        ratios = [a / b for a, b in zip(seconds[f"{part} sdpa"], seconds[f"{part} {NAME}"])]
        print(f"{part}: sdpa / {NAME}, median of paired ratios: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
