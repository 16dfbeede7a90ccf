"""What the logged KL to the initial model costs, over a whole batch and over `--kl-groups` groups of it.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_llm_kl.py --from-run runs/h3 --rounds 6

Every `detail_every` updates (5) the agent logs `charts/kl_to_initial`: a forward pass of the frozen reference
model over the sampled tokens, `LMPolicy.ref_token_logprobs`. It runs inside the update, so it is training time.
Here: a batch of 16 prompts x 8 completions sampled with the answer stop from the run's model (SmolLM2 with its
LoRA adapters), then the reference pass over the whole batch (`--kl-groups 0`, what every run before the
twenty-fifth session paid) and over its first 4 groups (the default), alternating within each round because
this machine's speed drifts. Prints the median seconds of each and the saving per update.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import random
import statistics
import time

import torch

from games import make
from llm_step import policy_from_run  # benchmarks/llm_step.py (the script's folder is on sys.path)
from llm_bridge.policy import kl_k3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", required=True, help="run folder of `ponglab train ppo addition` (LoRA, the default)")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds, after one warm-up round")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--kl-groups", type=int, default=4)
    ap.add_argument("--detail-every", type=int, default=5, help="updates between two KL estimates (the default)")
    args = ap.parse_args()

    policy = policy_from_run(args.from_run)
    rank = policy.lora_rank
    game = make("addition", num_envs=args.prompts * args.group_size, group_size=args.group_size)
    rng = random.Random(0)
    times: dict[str, list[float]] = {"all": [], "groups": []}
    kls: dict[str, list[float]] = {"all": [], "groups": []}
    for r in range(args.rounds + 1):
        prompts = [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer with just the number."
                   for _ in range(args.prompts)]
        batch = policy.generate(policy.encode_prompts(prompts), 16, num_samples=args.group_size,
                                stop_text=game.answer_done, draft=4)
        subsets = {"all": batch, "groups": batch[torch.arange(args.kl_groups * args.group_size)]}
        for name in (("all", "groups") if r % 2 else ("groups", "all")):
            t = time.perf_counter()
            ref = policy.ref_token_logprobs(subsets[name])
            if r > 0:
                times[name].append(time.perf_counter() - t)
                kls[name].append(float(kl_k3(subsets[name].logprobs, ref, subsets[name].completion_mask)))
    full, part = (statistics.median(times[k]) for k in ("all", "groups"))
    print(f"SmolLM2-135M + rank-{rank} adapters from {args.from_run}, {torch.get_num_threads()} threads, "
          f"{args.prompts} x {args.group_size} completions; median of {args.rounds} rounds")
    print(f"reference pass, whole batch      {full:6.2f} s   KL {statistics.mean(kls['all']):.3f}")
    print(f"reference pass, {args.kl_groups} groups         {part:6.2f} s   KL {statistics.mean(kls['groups']):.3f}")
    print(f"saved per update (one KL every {args.detail_every}): {(full - part) / args.detail_every:.2f} s")


if __name__ == "__main__":
    main()
