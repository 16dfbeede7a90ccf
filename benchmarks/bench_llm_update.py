"""What each speed-up of an LM RL step buys, side by side in one process (SmolLM2-135M, 2-digit addition).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_llm_update.py --rounds 6

One RL step of `ponglab train ppo addition` is: sample 8 prompts x 4 completions (`LMPolicy.generate`), one
forward + backward over the completions with signal (`LMPolicy.evaluate`; here a fixed 16 of the 32, as a typical
update trains 8-16), and one AdamW step. Each variant below switches on one more speed-up, in this order:

  baseline      float32; torch.multinomial sampler; every distinct prompt run whole; AdamW's per-tensor loop
  +sampler      one uniform per row and a search in the cumulative sum (`policy._inverse_cdf`)
  +prefix       the columns that all prompts share (chat template, "What is ") run once (`policy._prefill`)
  +fused        `torch.optim.AdamW(fused=True)`: one kernel over all 135M weights
  +bf16         float32 weights, forward passes under bfloat16 autocast (`--dtype mixed`; the CPU default
                where the CPU has AVX512-BF16 or AMX; elsewhere this variant stays float32, as --dtype auto does)
  +nodes        sampling runs one forward per distinct (prompt, tokens so far), not per row
                (`policy.SHARE_SAMPLING_NODES`)
  +stems        the training pass runs the completion tokens that all rows of a prompt share once
                (`policy.SHARE_COMPLETION_STEMS`)
  +draft        prompt-lookup speculative sampling: up to 4 tokens guessed from the prompt, checked in one pass
                (`generate(draft=4)`, the `--draft` default)
  +lora         not exact, unlike the ones above: LoRA rank 16 on every linear layer (`--lora-rank 16`;
                `llm_bridge.lora`): no gradients for the frozen weights, AdamW over 4.9M adapter weights
  +no-prompt-grad   not exact either: the training pass runs the prompt without a graph
                (`--no-prompt-grad`: same log-probs, the gradient only through the completion positions)

Completions here are real samples from SmolLM2 (answers to "What is A + B?"), so how many tokens the rows of a
group share is what the model writes; `--answer-stop` ends them where the text game's checker stops reading,
as the trainer does, and `--train-rows` picks the rows of whole groups.

The variants run in rounds (round r runs every variant once, in turn), so a change in machine load hits all of
them alike; the first round is a warm-up. Completions always run to --max-new-tokens (no stop token): the same
work in every variant. Reported: the median seconds of generation, training pass, optimizer step and the whole
step, and the speed-up of each variant over the baseline.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import random
import statistics
import time

from pathlib import Path

import torch

import llm_bridge.policy as policy_module
from agents.checkpoint import load_checkpoint
from games import make
from llm_bridge import LMPolicy, load_lm
from llm_bridge.policy import cpu_has_bf16
from llm_step import train_step  # benchmarks/llm_step.py (the script's folder is on sys.path)

VARIANTS = ("baseline", "+sampler", "+prefix", "+fused", "+bf16", "+nodes", "+stems", "+draft", "+lora",
            "+no-prompt-grad")


def multinomial(weights: torch.Tensor, generator: torch.Generator | None, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The sampler before: one exponential variate per vocabulary entry and row."""
    return torch.multinomial(weights if rows is None else weights[rows], 1, generator=generator).squeeze(-1)


def whole_prompts(model, ids, mask, cache, **kwargs):
    """The prompt pass before: every prompt run whole, shared columns included."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                 **policy_module.cached(model, cache), **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds (after one warm-up round)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--train-rows", type=int, default=16, help="completions in the training pass")
    ap.add_argument("--max-new-tokens", type=int, default=12, help="tokens per completion (~ the trained answer)")
    ap.add_argument("--from-run", default=None,
                    help="load the LM from this run folder's checkpoint (a model mid-training writes like one)")
    ap.add_argument("--answer-stop", action="store_true",
                    help="stop completions at EOS and where the addition checker stops reading, as in training "
                         "(default: always --max-new-tokens tokens, the same work in every variant)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="run only these (each still includes every change listed before it)")
    args = ap.parse_args()
    if args.rounds < 1 or args.train_rows > args.prompts * args.group_size:
        ap.error("--rounds must be >= 1 and --train-rows <= prompts x group size")

    model, tokenizer = load_lm("smollm2", device="cpu", dtype="float32")
    if args.from_run:
        state = load_checkpoint(Path(args.from_run) / "checkpoints" / "latest.pt")["agent"]["policy"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    game = make("addition", num_envs=args.prompts * args.group_size, group_size=args.group_size)
    stops = dict(stop_text=game.answer_done) if args.answer_stop else dict(stop_token_ids=[-1])  # -1: never stops
    plain = LMPolicy(model, tokenizer)  # both wrap the same weights
    mixed = LMPolicy(model, tokenizer, autocast=torch.bfloat16)
    native_bf16 = cpu_has_bf16()
    # The LoRA variant adapts a copy (add_lora replaces the copy's linear layers; the others keep the plain model).
    lora = LMPolicy(copy.deepcopy(model), tokenizer, autocast=torch.bfloat16 if native_bf16 else None, lora_rank=16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {False: torch.optim.AdamW(params, lr=1e-9, weight_decay=0.0),  # lr ~0: the weights stay put
                  True: torch.optim.AdamW(params, lr=1e-9, weight_decay=0.0, fused=True),
                  "lora": torch.optim.AdamW(lora.trainable_parameters(), lr=1e-9, weight_decay=0.0, fused=True)}
    rng = random.Random(0)
    originals = (policy_module._inverse_cdf, policy_module._prefill)

    def step(variant: str) -> tuple[float, float, float]:
        on = VARIANTS.index(variant)
        policy_module._inverse_cdf = originals[0] if on >= 1 else multinomial
        policy_module._prefill = originals[1] if on >= 2 else whole_prompts
        policy_module.SHARE_SAMPLING_NODES = on >= 5
        policy_module.SHARE_COMPLETION_STEMS = on >= 6
        # bfloat16 only where the CPU has it natively (what --dtype auto does); elsewhere +bf16 equals +fused.
        policy, optimizer = (mixed if on >= 4 and native_bf16 else plain), optimizers[on >= 3]
        if on >= 8:
            policy, optimizer = lora, optimizers["lora"]
        policy.prompt_grad = on < 9
        prompts = [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer with just the number."
                   for _ in range(args.prompts)]
        t0 = time.perf_counter()
        rollout = policy.generate(policy.encode_prompts(prompts), args.max_new_tokens,
                                  num_samples=args.group_size, draft=4 if on >= 7 else 0, **stops)
        gen = time.perf_counter() - t0
        return (gen, *train_step(policy, rollout, args.train_rows, optimizer, policy.trainable_parameters()))

    variants = [v for v in VARIANTS if v in args.variants]
    times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    try:
        for r in range(args.rounds + 1):
            for v in variants:
                t = step(v)
                if r > 0:
                    times[v].append(t)
            print(f"round {r}{' (warm-up)' if r == 0 else ''} done", flush=True)
    finally:
        policy_module._inverse_cdf, policy_module._prefill = originals
        policy_module.SHARE_SAMPLING_NODES = policy_module.SHARE_COMPLETION_STEMS = True
        plain.prompt_grad = mixed.prompt_grad = lora.prompt_grad = True

    print(f"\nSmolLM2-135M-Instruct{' from ' + args.from_run if args.from_run else ''}, {torch.get_num_threads()} threads, {args.prompts} x {args.group_size} "
          f"completions of {args.max_new_tokens} tokens, {args.train_rows} in the training pass; "
          f"median of {args.rounds} rounds, seconds")
    print(f"{'variant':<10} {'generate':>9} {'train':>7} {'optim':>7} {'step':>7} {'vs ' + variants[0]:>12}")
    base = None
    for v in variants:
        g, tr, o = (statistics.median(c) for c in zip(*times[v]))
        total = statistics.median(sum(t) for t in times[v])
        base = base or total
        print(f"{v:<10} {g:9.2f} {tr:7.2f} {o:7.2f} {total:7.2f} {base / total:11.2f}x")


if __name__ == "__main__":
    main()
