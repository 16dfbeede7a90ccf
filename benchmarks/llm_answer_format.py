"""Can SmolLM2 answer an addition without first repeating the question? Teacher-forced, greedy, no training.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_answer_format.py --problems 300

A trained policy answers "37 + 48 = 85": 8 of its ~11 tokens repeat the question. A bare "85" would make an update
several times cheaper, so does the model need the echo? Two ways to ask the *untrained* model, on the same problems:

  echo   the assistant turn starts with "37 + 48 = " (forced), then 3 greedy tokens;
  bare   the first token of the assistant turn is the most likely *digit*, then 2 greedy tokens.

A problem counts as right when the first digits written are the sum. Printed: the accuracy of each.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import random

import torch

from games.text import Arithmetic
from llm_bridge import LMPolicy


@torch.no_grad()
def accuracy(policy: LMPolicy, problems: list, forced: str, digit_first: bool, batch: int = 50) -> float:
    tok = policy.tokenizer
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    right = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        prompts = policy.encode_prompts([p.prompt for p in chunk])
        prefixes = [tok(forced.format(**p.meta), add_special_tokens=False)["input_ids"] for p in chunk]
        ids, mask = policy.pad_prompts([a + b for a, b in zip(prompts, prefixes)])  # [N, P] left-padded
        written = []
        for t in range(3):
            logits = policy.model(input_ids=ids, attention_mask=mask,
                                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]  # [N, V]
            if digit_first and t == 0:
                token = digit_ids[logits[:, digit_ids].argmax(-1)]  # the likeliest of "0".."9"
            else:
                token = logits.argmax(-1)
            written.append(token)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        for p, text in zip(chunk, tok.batch_decode(torch.stack(written, 1).tolist(), skip_special_tokens=True)):
            digits = "".join(c for c in text if c.isdigit())
            right += digits[: len(str(p.answer))] == str(p.answer)
    return right / len(problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    policy = LMPolicy.from_name("smollm2", device="cpu", dtype="float32")
    rng = random.Random(args.seed)
    problems = [Arithmetic().sample(rng) for _ in range(args.problems)]
    print(f"SmolLM2-135M-Instruct, untrained, {args.problems} 2-digit additions, greedy (float32)")
    print(f"echo  (assistant starts 'A + B = '):  {accuracy(policy, problems, '{a} + {b} = ', False):.1%}")
    print(f"bare  (first token a digit):          {accuracy(policy, problems, '', True):.1%}")


if __name__ == "__main__":
    main()
