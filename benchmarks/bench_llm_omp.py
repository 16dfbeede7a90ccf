"""What OpenMP's wait policy does to one LM RL step on a 2-core CPU (SmolLM2-135M, 2-digit addition).

    HF_HUB_OFFLINE=1 python benchmarks/bench_llm_omp.py --from-run runs/i1 --repeats 2 --rounds 4

Every command of this lab used to start with `OMP_WAIT_POLICY=PASSIVE`. Under PASSIVE, torch's OpenMP worker
threads go to sleep the moment a parallel region ends and must be woken (a futex call) at the start of the next
one. An LM step on two cores is thousands of small parallel regions (30 layers x a dozen ops per decoding pass;
rank-16 LoRA products in the training pass), so the wake-ups add up. Without it (`OMP_WAIT_POLICY` unset, GNU
OpenMP's default) a worker spins for a short while before it sleeps, and the next region usually finds it
awake; ACTIVE spins without a limit. Spinning is only a cost when another busy process wants the core: then
PASSIVE is the better choice (see the note in README).

Each policy runs in its own child process (the variable is read once, when OpenMP starts, so it cannot change
inside one), which loads SmolLM2 with the run's LoRA adapters (a trained policy writes short answers, as late in
a run) and times, per round: sampling 16 prompts x 8 completions with the answer stop and prompt-lookup drafts
(what `act` does) and one training step over 24 of them (forward + backward + clip + AdamW, `llm_step.py`). The
children run one after another, the policies alternating over `--repeats`, so drift in the machine's speed hits
all alike; the first round of each child is a warm-up. Prints the median seconds of each phase per policy and
the ratio to PASSIVE.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":  # before `import torch`
    if sys.argv[2] == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = sys.argv[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

POLICIES = ("PASSIVE", "unset", "ACTIVE")


def child(policy_name: str, run: str, rounds: int, seed: int) -> None:
    import torch

    from games import make
    from llm_step import policy_from_run, train_step  # benchmarks/llm_step.py (the script's folder is on sys.path)

    policy = policy_from_run(run)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)  # lr 0: the same work, the weights stay as loaded
    game = make("addition", num_envs=128, group_size=8)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {"sample": [], "train": []}
    for r in range(rounds + 1):
        prompts = [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer with just the number."
                   for _ in range(16)]
        t = time.perf_counter()
        batch = policy.generate(policy.encode_prompts(prompts), 16, num_samples=8, stop_text=game.answer_done,
                                draft=4)
        sample = time.perf_counter() - t
        forward_backward, step = train_step(policy, batch, 24, optimizer, params)
        if r:
            times["sample"].append(sample)
            times["train"].append(forward_backward + step)
    print(json.dumps({"policy": policy_name, "threads": torch.get_num_threads(), **times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", required=True, help="run folder of `ponglab train ppo addition` (LoRA, the default)")
    ap.add_argument("--repeats", type=int, default=2, help="child processes per policy, alternating")
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds per child, after one warm-up round")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated: PASSIVE, unset, ACTIVE")
    args = ap.parse_args()
    if not (Path(args.from_run) / "checkpoints" / "latest.pt").is_file():
        raise SystemExit(f"error: {args.from_run}/checkpoints/latest.pt not found: pass the folder of a finished "
                         "`ponglab train ppo addition` run.")
    policies = args.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"error: unknown policy {p!r}: use {', '.join(POLICIES)}.")
    results: dict[str, dict[str, list[float]]] = {p: {"sample": [], "train": []} for p in policies}
    for rep in range(args.repeats):
        for p in policies if rep % 2 == 0 else policies[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", p, args.from_run, str(args.rounds), str(rep)],
                                 check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            for k in ("sample", "train"):
                results[p][k].extend(res[k])
            threads = res["threads"]
    print(f"SmolLM2-135M + adapters of {args.from_run}, {threads} torch threads; 16 prompts x 8 completions, "
          f"training step over 24; median of {args.repeats} x {args.rounds} rounds")
    base = {k: statistics.median(results["PASSIVE"][k]) for k in ("sample", "train")} if "PASSIVE" in results else None
    print(f"{'OMP_WAIT_POLICY':<16}{'sample (s)':>12}{'train (s)':>12}{'both (s)':>12}{'vs PASSIVE':>12}")
    for p in policies:
        s, t = (statistics.median(results[p][k]) for k in ("sample", "train"))
        ratio = f"{(base['sample'] + base['train']) / (s + t):.2f}x" if base else "-"
        print(f"{p:<16}{s:>12.2f}{t:>12.2f}{s + t:>12.2f}{ratio:>12}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
