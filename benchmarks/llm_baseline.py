"""SmolLM2-135M-Instruct before any RL: load time, sampling throughput, and 2-digit addition accuracy.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_baseline.py            # CPU, all three
    python benchmarks/llm_baseline.py --no-gguf-load --n-additions 300 --device cuda

What is measured (all with llm_bridge's own sampling loop, `LMPolicy.generate`):
  * load: `load_lm("smollm2", cache=False)` (read + de-quantize the GGUF) and `cache=True` (the float32
    safetensors copy under $PONGLAB_CACHE, written by the first load).
  * throughput: one batch of `batch_size` chat prompts "What is A + B? Answer with just the number.",
    `max_new_tokens` new tokens, greedy and sampled (temperature 1). tokens/s counts generated tokens
    (completion_mask, i.e. up to and including <|im_end|>); slots/s counts batch x steps run (the work
    actually done: finished rows still ride along until the whole batch stops). One warm-up batch first.
  * accuracy: `n_additions` random A + B with A, B in [10, 99]; the answer is the LAST integer in the
    decoded completion (and, for comparison, the first). Greedy, and the mean over `samples` samples
    at each of `temperatures`: the success rate an RL run starts from.

Tip: on a machine shared with other busy processes, torch's OpenMP threads spin-wait and can run ~20x
slower; `OMP_WAIT_POLICY=PASSIVE` avoids that (it must be set before torch starts).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import tyro

from llm_bridge import LMPolicy, load_lm

PROMPT = "What is {a} + {b}? Answer with just the number."


@dataclass(frozen=True)
class Config:
    model: str = "smollm2"
    """model name for llm_bridge.load_lm ("smollm2", "tiny" or a path)"""
    device: str = "cpu"
    """torch device: cpu, cuda, auto"""
    dtype: str = "auto"
    """auto = float32 on CPU, bfloat16 on CUDA"""
    batch_size: int = 32
    """prompts per generate() call"""
    max_new_tokens: int = 16
    """tokens generated per prompt (at most)"""
    n_additions: int = 100
    """random 2-digit additions for the accuracy estimate"""
    samples: int = 2
    """samples per addition at each sampling temperature (0 = skip the sampled accuracy)"""
    temperatures: tuple[float, ...] = (1.0, 0.7)
    """sampling temperatures for the sampled accuracy"""
    gguf_load: bool = True
    """also time a cold load from the GGUF file (cache=False), ~20 s on 2 CPU cores"""
    seed: int = 0
    """seed for the problems and the sampler"""
    out: str = ""
    """optional path of a JSON file for the results"""


def last_int(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def first_int(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[0]) if found else None


def timed_generate(policy: LMPolicy, ids: list[list[int]], cfg: Config, **kw) -> tuple[float, object]:
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rollout = policy.generate(ids, cfg.max_new_tokens, **kw)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, rollout


def main(cfg: Config) -> dict:
    results: dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads(),
                     "load_average_at_start": os.getloadavg()[0]}
    if cfg.model == "smollm2" and cfg.gguf_load:
        start = time.perf_counter()
        load_lm("smollm2", device=cfg.device, dtype=cfg.dtype, cache=False)
        results["load_gguf_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    model, tokenizer = load_lm(cfg.model, device=cfg.device, dtype=cfg.dtype)  # writes the cache if missing
    results["load_cached_s"] = round(time.perf_counter() - start, 2)
    policy = LMPolicy(model, tokenizer)
    print(f"loaded {cfg.model}: {results}", flush=True)

    # ---- throughput
    rng = random.Random(cfg.seed)
    prompts = [PROMPT.format(a=rng.randint(10, 99), b=rng.randint(10, 99)) for _ in range(cfg.batch_size)]
    ids = policy.encode_prompts(prompts)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    timed_generate(policy, ids, cfg, greedy=True)  # warm-up
    # Prefill (the prompt pass) dominates at 16 new tokens: time it alone via a 1-token generate.
    start = time.perf_counter()
    policy.generate(ids, 1, greedy=True)
    results["prefill_plus_1_token_s"] = round(time.perf_counter() - start, 3)
    for mode, kw in (("greedy", {"greedy": True}), ("sampled_t1", {"temperature": 1.0, "generator": gen})):
        seconds, r = timed_generate(policy, ids, cfg, **kw)
        tokens = int(r.completion_mask.sum())
        slots = r.completion_ids.numel()
        results[f"throughput_{mode}"] = {
            "seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "slots_per_s": round(slots / seconds, 1), "prompt_len": r.prompt_ids.shape[1], "steps": r.completion_ids.shape[1],
        }
        print(mode, results[f"throughput_{mode}"], flush=True)

    # ---- accuracy on 2-digit additions
    problems = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(cfg.n_additions)]
    ids = policy.encode_prompts([PROMPT.format(a=a, b=b) for a, b in problems])
    batches = [range(i, min(i + cfg.batch_size, len(ids))) for i in range(0, len(ids), cfg.batch_size)]
    texts: list[str] = []
    for rows in batches:
        texts += policy.generate([ids[i] for i in rows], cfg.max_new_tokens, greedy=True).texts
    truth = [a + b for a, b in problems]
    results["greedy_accuracy_last_int"] = sum(last_int(t) == s for t, s in zip(texts, truth)) / len(truth)
    results["greedy_accuracy_first_int"] = sum(first_int(t) == s for t, s in zip(texts, truth)) / len(truth)
    results["greedy_examples"] = [f"{a}+{b}: {t!r}" for (a, b), t in list(zip(problems, texts))[:6]]
    print("greedy accuracy", results["greedy_accuracy_last_int"], "(first int:", results["greedy_accuracy_first_int"], ")")
    for ex in results["greedy_examples"]:
        print("  ", ex)
    for temperature in cfg.temperatures if cfg.samples > 0 else ():
        hits = 0
        for _ in range(cfg.samples):
            for rows in batches:
                out = policy.generate([ids[i] for i in rows], cfg.max_new_tokens, temperature=temperature, generator=gen)
                hits += sum(last_int(t) == truth[i] for t, i in zip(out.texts, rows))
        results[f"sampled_t{temperature}_accuracy_last_int"] = hits / (cfg.samples * len(truth))
        print(f"sampled (T={temperature}) accuracy", results[f"sampled_t{temperature}_accuracy_last_int"], flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "greedy_examples"}, indent=None))
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
