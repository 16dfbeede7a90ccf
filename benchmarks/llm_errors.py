"""Where a trained LM still fails on held-out addition: accuracy by carry class, sample failures, pass@k.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_errors.py runs/ppo_addition_1_...

Reads the run's checkpoint (or the untrained model with `base`), decodes the 500 held-out 2-digit additions greedily
and prints accuracy split by "ones digits carry" and "sum >= 100", a few wrong completions, and, for the first
`failures` greedy failures, the accuracy of `k` samples at temperature 1 and pass@k (does any sample get it right?):
whether reward-only RL still has signal to learn from where greedy decoding is wrong. Then, teacher-forced on
"A + B = <right sum>", how likely the model finds each right digit: are the wrong leading digits near misses (the
right digit a close second) or far off?
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import tyro

from agents.checkpoint import load_checkpoint
from games.text import make_task, test_set
from llm_bridge import LMPolicy
from llm_bridge.agent import load_policy


@dataclass(frozen=True)
class Config:
    run: tyro.conf.Positional[str]
    """Run folder written by `ponglab train ppo addition`, or `base` for the untrained model."""
    model: str = "smollm2"
    """The run's model (llm_bridge.load_lm name)."""
    k: int = 8
    """Samples per failure for pass@k."""
    failures: int = 48
    """How many greedy failures to resample."""
    max_new_tokens: int = 16
    """Completion budget, as in training."""
    seed: int = 0
    """Sampling seed."""


def main(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    policy = LMPolicy.from_name(cfg.model, device="cpu", reference=True)
    if cfg.run != "base":
        load_policy(policy, load_checkpoint(f"{cfg.run}/checkpoints/latest.pt")["agent"])
    task = make_task("addition")
    problems = test_set(task)
    texts: list[str] = []
    for i in range(0, len(problems), 100):
        ids = policy.encode_prompts([p.prompt for p in problems[i : i + 100]])
        texts += policy.generate(ids, cfg.max_new_tokens, greedy=True).texts
    right = np.array([task.score(t, p) for t, p in zip(texts, problems)])  # [500] 1.0 / 0.0
    print(f"greedy accuracy {right.mean():.3f} on {len(problems)} held-out problems")
    carry = np.array([(p.meta["a"] % 10 + p.meta["b"] % 10) >= 10 for p in problems])
    big = np.array([p.meta["a"] + p.meta["b"] >= 100 for p in problems])
    for c in (False, True):
        for b in (False, True):
            sel = (carry == c) & (big == b)
            print(f"  ones digits carry={c!s:5} sum>=100={b!s:5}  n={sel.sum():3d}  accuracy {right[sel].mean():.3f}")
    failed = [i for i in range(len(problems)) if right[i] < 1]
    for i in failed[:10]:
        print(f"  {problems[i].prompt.split('?')[0][8:]:>8} -> {texts[i]!r}")
    digit_report(policy, problems)
    picked = failed[: cfg.failures]
    if not picked:
        return
    ro = policy.generate(policy.encode_prompts([problems[i].prompt for i in picked]), cfg.max_new_tokens,
                         temperature=1.0, num_samples=cfg.k)
    hits = np.array([task.score(t, problems[picked[j // cfg.k]]) for j, t in enumerate(ro.texts)]).reshape(-1, cfg.k)
    print(f"{len(failed)} greedy failures; on {len(picked)} of them, one sample at temperature 1 is right "
          f"{hits.mean():.3f} of the time, pass@{cfg.k} = {(hits.max(1) > 0).mean():.3f}")


@torch.no_grad()
def digit_report(policy: LMPolicy, problems: list) -> None:
    """Teacher-forced on the completion "A + B = S" (the format trained models settle on), the probability of each
    right digit of S given the right digits before it, and whether it is the most likely token."""
    policy.eval()
    first, first_top, tens = [], [], []
    for p in problems:
        a, b = p.meta["a"], p.meta["b"]
        s = str(a + b)
        prompt = policy.encode_prompts([p.prompt])[0]
        completion = policy.tokenizer(f"{a} + {b} = {s}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + completion])
        logp = policy.model(input_ids=ids).logits[0].float().log_softmax(-1)  # [P+C, V]
        start = ids.shape[1] - len(s)  # SmolLM2 writes numbers one digit per token
        probs = [logp[start + j - 1, ids[0, start + j]].exp().item() for j in range(len(s))]
        first.append(probs[0])
        first_top.append(bool(logp[start - 1].argmax() == ids[0, start]))
        tens.append(probs[-2])
    first, first_top, tens = np.array(first), np.array(first_top), np.array(tens)
    print(f"teacher-forced: the leading digit is the model's top token on {first_top.mean():.3f} of the problems; "
          f"where it is not ({(~first_top).sum()}), P(right leading digit) quartiles "
          f"{np.quantile(first[~first_top], [0.25, 0.5, 0.75]).round(3).tolist() if (~first_top).any() else '-'}; "
          f"P(right tens digit) 5% / 10% quantiles {np.quantile(tens, [0.05, 0.1]).round(3).tolist()}")


if __name__ == "__main__":
    main(tyro.cli(Config))
