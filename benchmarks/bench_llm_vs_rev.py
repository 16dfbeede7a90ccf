"""One LM RL step of this checkout against the same step of an earlier revision's `llm_bridge/policy.py`, side by
side in one process, on the same weights, prompts and seeds (SmolLM2-135M, 2-digit addition).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_llm_vs_rev.py --rev 8916500 \\
        --from-run runs/d1 --rounds 10

A step: sample 8 prompts x 4 completions with the answer stop (`generate`; this checkout with `--draft`, the
agent's default, the old revision as it was), one forward + backward over the first `--train-rows` completions
(`evaluate`, with the entropy, as the agent calls it), the gradient clip and a fused AdamW step (lr ~0, so the
weights stay put). The two alternate within each round, in turn first, because this machine's speed drifts
from minute to minute; the figure to read is the median over rounds of the per-round ratio. The first round
is a warm-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llm_bridge.policy as current
from agents.checkpoint import load_checkpoint
from games import make
from llm_bridge import load_lm
from llm_step import train_step  # benchmarks/llm_step.py (the script's folder is on sys.path)


def policy_module_at(rev: str):
    """`llm_bridge/policy.py` as it was at git revision `rev`, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:llm_bridge/policy.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "policy_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("policy_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["policy_at_rev"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision to compare with (e.g. a commit before a speed-up)")
    ap.add_argument("--from-run", default=None, help="load the LM from this run folder's checkpoint")
    ap.add_argument("--rounds", type=int, default=10, help="measured rounds (after one warm-up round)")
    ap.add_argument("--train-rows", type=int, default=16)
    ap.add_argument("--draft", type=int, default=4, help="this checkout's generate(draft=...)")
    args = ap.parse_args()

    old = policy_module_at(args.rev)
    model, tokenizer = load_lm("smollm2", device="cpu", dtype="float32")
    if args.from_run:
        state = load_checkpoint(Path(args.from_run) / "checkpoints" / "latest.pt")["agent"]["policy"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    autocast = torch.bfloat16 if current.cpu_has_bf16() else None  # what --dtype auto picks
    policies = {args.rev: old.LMPolicy(model, tokenizer, autocast=autocast),
                "this checkout": current.LMPolicy(model, tokenizer, autocast=autocast)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-9, weight_decay=0.0, fused=True)
    game = make("addition", num_envs=32, group_size=4)
    rng = random.Random(0)

    def step(name: str, ids: list[list[int]], seed: int) -> tuple[float, float, float, float]:
        policy = policies[name]
        extra = {"draft": args.draft} if name == "this checkout" else {}
        t0 = time.perf_counter()
        rollout = policy.generate(ids, 16, num_samples=4, stop_text=game.answer_done,
                                  generator=torch.Generator().manual_seed(seed), **extra)
        gen = time.perf_counter() - t0
        train, optim = train_step(policy, rollout, args.train_rows, optimizer, params)
        return gen, train, optim, gen + train + optim

    names = list(policies)
    times: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        ids = policies[names[1]].encode_prompts(
            [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer with just the number." for _ in range(8)])
        for name in (names if r % 2 == 0 else names[::-1]):
            t = step(name, ids, r)
            if r > 0:
                times[name].append(t)
        print(f"round {r}{' (warm-up)' if r == 0 else ''} done", flush=True)

    print(f"\nSmolLM2-135M-Instruct{' from ' + args.from_run if args.from_run else ''}, {torch.get_num_threads()} threads, "
          f"8 x 4 completions with the answer stop, {args.train_rows} trained; median of {args.rounds} rounds, seconds")
    print(f"{'':<16} {'generate':>9} {'train':>7} {'optim':>7} {'step':>7}")
    for name in names:
        print(f"{name:<16} " + " ".join(f"{statistics.median(c):{w}.2f}" for c, w in zip(zip(*times[name]), (9, 7, 7, 7))))
    for i, part in enumerate(("generate", "train", "step")):
        k = (0, 1, 3)[i]
        ratio = statistics.median(a[k] / b[k] for a, b in zip(times[names[0]], times[names[1]]))
        print(f"{part}: {ratio:.2f}x faster than {args.rev} (median of the per-round ratios)")


if __name__ == "__main__":
    main()
