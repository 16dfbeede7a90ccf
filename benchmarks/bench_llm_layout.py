"""Which weight layout the CPU multiplies faster while sampling: [out, in] (nn.Linear's) or W^T stored [in, out].

    HF_HUB_OFFLINE=1 python benchmarks/bench_llm_layout.py --from-run runs/i1 --rounds 4

`linear(x, W)` computes x [M, in] @ W^T. With W stored as nn.Linear stores it, [out, in], the GEMM reads the
second operand transposed; with a contiguous [in, out] copy of W^T (passed as its [out, in] view) it reads it
as is. Same numbers, but for the few rows of a decoding pass the CPU's GEMM is much faster on the second.
Part 1 times both on SmolLM2-135M's shapes (the 7 linear layers of its 30 blocks, and the [49152, 576] LM head)
for M rows. Part 2 times the LoRA merge of `generate` (`lora.merged_adapters`): as first built (a fresh
[out, in] tensor per layer on every call), as built from the twenty-sixth session (a fresh [in, out] tensor,
reading W^T across the rows of W [out, in]), and now (a fresh [in, out], from the row-major copy of W^T that each layer keeps, `LoRALinear.base_t`).
Part 3 times whole `generate` calls of 16 prompts x 8 completions (the answer stop, drafts of 4, the run's LoRA
adapters) with those three, alternating within each round; the first round is a warm-up. The first two also
leave the LM head as it is, the third two use its row-major copy (`LMPolicy._row_major_head`).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import random
import statistics
import time

import torch
import torch.nn.functional as F

import llm_bridge.lora as lora_module
import llm_bridge.policy as policy_module
from games import make
from llm_bridge import LMPolicy
from llm_step import policy_from_run  # benchmarks/llm_step.py (the script's folder is on sys.path)


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def part1(policy: LMPolicy, reps: int) -> None:
    blocks = [m.base.weight for m in lora_module.lora_layers(policy.model)]
    blocks_t = [w.t().contiguous() for w in blocks]
    head = policy.model.get_output_embeddings().weight
    head_t = head.t().contiguous()
    print(f"{'rows M':>7}{'blocks [out,in]':>17}{'blocks W^T':>12}{'ratio':>7}{'head [out,in]':>15}{'head W^T':>10}{'ratio':>7}")
    with torch.no_grad():
        for M in (1, 4, 8, 16, 32, 64, 128, 320):
            xs = {w.shape[1]: torch.randn(M, w.shape[1]) for w in blocks}
            a = timed(lambda: [F.linear(xs[w.shape[1]], w) for w in blocks], reps)
            b = timed(lambda: [F.linear(xs[w.shape[0]], w.t()) for w in blocks_t], reps)
            x = torch.randn(M, head.shape[1])
            c = timed(lambda: F.linear(x, head), reps * 3)
            d = timed(lambda: F.linear(x, head_t.t()), reps * 3)
            print(f"{M:>7}{a * 1e3:>14.1f} ms{b * 1e3:>9.1f} ms{a / b:>6.2f}x{c * 1e3:>12.1f} ms{d * 1e3:>7.1f} ms{c / d:>6.2f}x")


def fresh_merges(policy: LMPolicy) -> dict[str, object]:
    """The two earlier merges, as context managers like `lora.merged_adapters`, from W [out, in]."""
    layers = lora_module.lora_layers(policy.model)
    plain = [layer.base.weight for layer in layers]  # W [out, in]

    def merge(row_major: bool):
        @contextlib.contextmanager
        def merged(model):
            with torch.no_grad():
                for layer, w in zip(layers, plain):
                    if row_major:  # (W + s B A)^T = W^T + s A^T B^T into a new [in, out], seen as [out, in]
                        layer.merged = torch.addmm(w.t(), layer.lora_a.t(), layer.lora_b.t(), alpha=layer.scale).t()
                    else:  # W + s B A into a new [out, in]
                        layer.merged = torch.addmm(w, layer.lora_b, layer.lora_a, alpha=layer.scale)
            try:
                yield
            finally:
                for layer in layers:
                    layer.merged = None
        return merged

    return {"fresh [out, in]": merge(False), "fresh [in, out]": merge(True), "from row-major W": policy_module.merged_adapters}


def part2(policy: LMPolicy, merges: dict[str, object], reps: int) -> None:
    def enter_exit(cm):
        with cm(policy.model):
            pass
    times = {name: timed(lambda: enter_exit(cm), reps) for name, cm in merges.items()}
    print("LoRA merge of all 210 layers: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))


def part3(policy: LMPolicy, merges: dict[str, object], rounds: int) -> None:
    game = make("addition", num_envs=128, group_size=8)
    rng = random.Random(0)
    row_major_head, merged = LMPolicy._row_major_head, policy_module.merged_adapters
    times: dict[str, list[float]] = {name: [] for name in merges}
    for r in range(rounds + 1):
        prompts = [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer with just the number."
                   for _ in range(16)]
        for name in (list(times) if r % 2 else list(times)[::-1]):
            if name == "fresh [out, in]":
                LMPolicy._row_major_head = lambda self: contextlib.nullcontext()
            policy_module.merged_adapters = merges[name]
            t = time.perf_counter()
            policy.generate(policy.encode_prompts(prompts), 16, num_samples=8, stop_text=game.answer_done,
                            draft=4, generator=torch.Generator().manual_seed(r))
            if r:
                times[name].append(time.perf_counter() - t)
            LMPolicy._row_major_head, policy_module.merged_adapters = row_major_head, merged
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["fresh [out, in]"]
    print(f"generate 16 x 8, median of {rounds}: " + ", ".join(f"{k} {v:.2f} s ({base / v:.2f}x)" for k, v in med.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", required=True, help="run folder of `ponglab train ppo addition` (LoRA, the default)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per timing in part 1")
    args = ap.parse_args()
    policy = policy_from_run(args.from_run)
    print(f"SmolLM2-135M, float32, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    part1(policy, args.reps)
    merges = fresh_merges(policy)
    part2(policy, merges, args.reps)
    part3(policy, merges, args.rounds)


if __name__ == "__main__":
    main()
