"""How close the signal is: for the held-out problems a trained run gets wrong (greedy), is the right answer among
the beam's most probable completions, and how much of the policy's mass do they hold?

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_beam_coverage.py runs/a_ref --problems 200

Prints each wrong problem with its beam (completion, probability), then the counts. This is the measurement behind
`--beam` in docs/llm.md: a group of G samples finds a right answer of probability p only 1 - (1 - p)^G of the time,
the beam finds it whenever it is among the K most probable completions.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
from pathlib import Path

from agents.checkpoint import load_checkpoint
from games import make
from games.text import test_set
from llm_bridge import LMPolicy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder of `ponglab train ppo addition` (its checkpoints/latest.pt)")
    ap.add_argument("--problems", type=int, default=200, help="the first N held-out problems")
    ap.add_argument("--width", type=int, default=4, help="beam width K")
    ap.add_argument("--batch", type=int, default=25)
    args = ap.parse_args()

    policy = LMPolicy.from_name("smollm2", device="cpu")
    state = load_checkpoint(Path(args.run_dir) / "checkpoints" / "latest.pt")["agent"]["policy"]
    policy.load_state_dict({k: v for k, v in state.items() if not k.startswith("ref_model")}, strict=False)
    game = make("addition", num_envs=1, split="test")
    problems = test_set(game.task)[: args.problems]
    K, wrong, found, masses, p_right = args.width, 0, 0, [], []
    for i in range(0, len(problems), args.batch):
        batch = problems[i : i + args.batch]
        ids = policy.encode_prompts([p.prompt for p in batch])
        greedy = policy.generate(ids, 16, greedy=True, stop_text=game.answer_done)
        beam = policy.generate(ids, 16, num_samples=K, beam=True, stop_text=game.answer_done)
        probs = beam.logprobs.sum(1).exp().view(-1, K)  # [problems, K] p(completion)
        for j, problem in enumerate(batch):
            texts = beam.texts[j * K : (j + 1) * K]
            distinct = {t: float(p) for t, p in zip(texts, probs[j])}  # filler rows repeat the best
            masses.append(sum(distinct.values()))
            if game.task.score(greedy.texts[j], problem) == 1:
                continue
            wrong += 1
            right = [p for t, p in distinct.items() if game.task.score(t, problem) == 1]
            if right:
                found += 1
                p_right.append(right[0])
            print(f"{problem.prompt!r}: greedy {greedy.texts[j]!r}; beam {[(t, round(p, 3)) for t, p in distinct.items()]}")
    print(f"\n{args.run_dir}: {wrong} of {len(problems)} greedy answers wrong; the right answer is in the beam of {K} "
          f"for {found} of them, at p = {', '.join(f'{p:.2f}' for p in sorted(p_right))}; the beam holds "
          f"{sum(masses) / len(masses):.3f} of the policy's mass on average")


if __name__ == "__main__":
    main()
