"""One RL step on a language model, side by side: ponglab's `LMAgent` vs TRL's `GRPOTrainer`.

Same machine, same process, same model (SmolLM2-135M-Instruct, float32), same task (2-digit addition, prompt
"What is A + B? Answer with just the number." in the chat template), same batch (--prompts x --group-size
completions), same --max-new-tokens, temperature 1, one optimizer step per batch, no KL term, and the same
loss recipe on both sides: token-level clipped PPO loss averaged over all tokens of the batch (TRL
`loss_type="dapo"`), advantage = reward - group mean without std scaling (TRL `scale_rewards="none"`),
AdamW (fused=True on both sides, lr 1e-5, no weight decay, constant lr), grad-norm clip 1.0, no gradient
checkpointing, no mixed precision.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_trl.py --steps 5
    python benchmarks/bench_trl.py --device cuda --prompts 64 --group-size 8 --max-new-tokens 128

How it is timed. The steps are interleaved so that both see the same machine load: TRL runs `train()` for
1 + --steps optimizer steps, and a callback runs one ponglab step right after each TRL step (the first pair is
the warm-up and is not counted). Per step:
  * TRL    step = `on_step_begin` -> `on_step_end` of the HF Trainer loop (generation, reward, advantages,
           forward, backward, clip, optimizer, scheduler). `generate` = `GRPOTrainer._generate` (chat template +
           tokenize + `model.generate` + decode), of which `hf_generate` = `_generate_single_turn` alone;
           `reward` = `_calculate_rewards`; `update` = step - `_generate_and_score_completions`. The loop's own
           work between steps (logging every step, fetching the next prompts) is reported as `between_steps`.
  * ponglab step = `agent.act` (chat template + tokenize + KV-cache sampling + decode) + `game.step` (reward)
           + `agent.observe` + `agent.update` (one forward with grad, PPO loss, backward, clip, AdamW).
`CPU time` is the process CPU time (all threads) of the step, or of generation: less sensitive than wall time
to other processes competing for the cores, since waiting for a core is not counted.
Generated tokens are completion tokens up to and including the end-of-turn token (TRL: the lengths of its
`completion_ids`; ponglab: `completion_mask.sum()`); tokens/s = generated tokens / generation time.

OMP_WAIT_POLICY=PASSIVE is set before torch is imported: with busy neighbours, OpenMP's spinning threads
can slow CPU torch many times over on this 2-core machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

from agents.common import Transition, seed_everything
from games.text import Problem, make_task, make_text_game
from llm_bridge.agent import LMAgent, LMConfig
from llm_bridge.models import load_lm

LR = 1e-5
CLIP = 0.2


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured RL steps per side (after 1 warm-up step)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides use it)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights dtype of both models (no autocast on either side)")
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts per RL step")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="longest completion, in tokens")
    ap.add_argument("--model", default="smollm2", help="llm_bridge.load_lm name or a local HF model folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in ("steps", "prompts", "group_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        ap.error("--group-size must be >= 2: the group mean is the baseline on both sides")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ ponglab side


class PonglabSide:
    """LMAgent + TextGame driven by hand, one RL step per `step()`, with the pieces timed."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        n = args.prompts * args.group_size
        fields = {f.name for f in dataclasses.fields(LMConfig)}
        extra: dict[str, Any] = {}
        if "detail_every" in fields:
            # update() runs an extra reference-model forward (KL logging) and builds a text panel every
            # `detail_every` updates. Update 0 (the warm-up) does it; the measured ones do not, as TRL with
            # beta=0 never runs a reference model.
            extra["detail_every"] = 10**9
        cfg = LMConfig(model=args.model, dtype=args.dtype, group_size=args.group_size,
                       max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, advantage="group",
                       scale_by_std=False, llm_lr=LR, llm_epochs=1, llm_minibatches=1, llm_clip=CLIP,
                       ent_bonus=0.0, kl_coef=0.0, grad_clip=1.0,
                       # TRL's loss runs over every completion, zero-advantage ones included; do the same work here
                       # (ponglab's default skips them: exact same gradient direction, far less compute early on).
                       skip_zero_advantage=False, **extra)
        self.device = device
        self.agent = LMAgent(cfg, n, device, seed=args.seed)
        self.game = make_text_game("addition", n, seed=args.seed, group_size=args.group_size)
        self.obs, _ = self.game.reset(seed=args.seed)
        self.records: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        dev = self.device
        sync(dev)
        c0, t0 = time.process_time(), time.perf_counter()
        completions = self.agent.act(self.obs, explore=True)
        sync(dev)
        c1, t1 = time.process_time(), time.perf_counter()
        next_obs, reward, term, trunc, info = self.game.step(completions)
        t2 = time.perf_counter()
        ro = self.agent.rollout
        tokens = int(ro.completion_mask.sum())
        self.agent.observe(Transition(self.obs, completions, reward, term, trunc, next_obs, next_obs, info))
        self.agent.update(0, 1)
        sync(dev)
        t3 = time.perf_counter()
        self.obs = next_obs
        rec = {"step": t3 - t0, "cpu": time.process_time() - c0, "generate": t1 - t0, "generate_cpu": c1 - c0,
               "reward": t2 - t1,
               "update": t3 - t2, "tokens": tokens, "T": ro.completion_ids.shape[1],
               "accuracy": float(np.mean(info["episode"]["r"]))}
        self.records.append(rec)
        return rec


# ------------------------------------------------------------------------------------------------ TRL side


def addition_dataset(n_prompts: int, seed: int):
    """Conversational prompts drawn with ponglab's addition task; `a`, `b`, `answer` columns for the reward."""
    from datasets import Dataset

    task, rng = make_task("addition"), random.Random(f"bench-trl:{seed}")
    rows = []
    for _ in range(n_prompts):
        p = task.sample(rng)
        rows.append({"prompt": [{"role": "user", "content": p.prompt}], "a": p.meta["a"], "b": p.meta["b"],
                     "answer": int(p.answer)})
    return Dataset.from_list(rows)


def make_reward_fn():
    """TRL reward function scoring with ponglab's own checker (`Arithmetic.score`)."""
    task = make_task("addition")

    def addition_reward(prompts, completions, a, b, answer, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.score(t, Problem(p[-1]["content"] if isinstance(p, list) else p, int(s),
                                      {"a": int(x), "b": int(y)}))
                for t, p, x, y, s in zip(texts, prompts, a, b, answer)]

    return addition_reward


def build_trl(args: argparse.Namespace, device: torch.device, ponglab: PonglabSide, out_dir: str):
    """A GRPOTrainer configured like ponglab's defaults, with timers around its phases."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with wall-clock timers on generation, reward and the whole sampling phase."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.timers: dict[str, float] = {}
            self.gen_tokens = self.max_len = 0
            self.accuracy = float("nan")

        def _timed(self, name: str, fn, *a, **kw):
            sync(device)
            c, t = time.process_time(), time.perf_counter()
            out = fn(*a, **kw)
            sync(device)
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - t
            self.timers[name + "_cpu"] = self.timers.get(name + "_cpu", 0.0) + time.process_time() - c
            return out

        def _generate(self, prompts):
            return self._timed("generate", super()._generate, prompts)

        def _generate_single_turn(self, *a, **kw):
            completion_ids, logprobs = self._timed("hf_generate", super()._generate_single_turn, *a, **kw)
            self.gen_tokens += sum(len(c) for c in completion_ids)  # up to and including EOS
            self.max_len = max(self.max_len, max(len(c) for c in completion_ids))
            return completion_ids, logprobs

        def _calculate_rewards(self, *a, **kw):
            rewards = self._timed("reward", super()._calculate_rewards, *a, **kw)  # [N, num reward funcs]
            self.accuracy = float(rewards.float().mean())
            return rewards

        def _generate_and_score_completions(self, *a, **kw):
            return self._timed("sample_phase", super()._generate_and_score_completions, *a, **kw)

    class Interleave(TrainerCallback):
        """Time each TRL optimizer step; after it, run one ponglab step (both share the machine's load)."""

        def __init__(self):
            self.records: list[dict[str, float]] = []
            self.resumed_at: float | None = None
            self.t0 = 0.0

        def on_step_begin(self, targs, state, control, **kw):
            sync(device)
            self.c0, self.t0 = time.process_time(), time.perf_counter()
            self.between = self.t0 - self.resumed_at if self.resumed_at is not None else float("nan")
            trainer.timers.clear()
            trainer.gen_tokens = trainer.max_len = 0

        def on_step_end(self, targs, state, control, **kw):
            sync(device)
            t = trainer.timers
            step, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            self.records.append({"step": step, "cpu": cpu, "generate": t["generate"], "generate_cpu": t["generate_cpu"],
                                 "hf_generate": t["hf_generate"], "reward": t["reward"],
                                 "update": step - t["sample_phase"], "tokens": trainer.gen_tokens, "T": trainer.max_len,
                                 "accuracy": trainer.accuracy, "between_steps": self.between})
            rec = ponglab.step()
            label = "warm-up" if len(self.records) == 1 else f"step {len(self.records) - 1}"
            print(f"  {label}: TRL {step:.2f}s, ponglab {rec['step']:.2f}s  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
            self.resumed_at = time.perf_counter()

    n = args.prompts * args.group_size
    model, tokenizer = load_lm(args.model, device=str(device), dtype=args.dtype)
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=n,  # one micro-batch of all completions = one optimizer step (as ponglab)
        gradient_accumulation_steps=1,
        num_generations=args.group_size,  # n / group_size distinct prompts per step
        steps_per_generation=1,
        num_iterations=1,
        max_steps=1 + args.steps,
        max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, epsilon=CLIP, loss_type="dapo", scale_rewards="none",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused",
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, fp16=False,
        use_vllm=False, use_cpu=device.type == "cpu",
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        shuffle_dataset=False, seed=args.seed, dataloader_num_workers=0,
    )
    interleave = Interleave()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=make_reward_fn(), args=config,
                               train_dataset=addition_dataset(args.prompts * (args.steps + 2), args.seed),
                               processing_class=tokenizer, callbacks=[interleave])
    trainer.remove_callback(PrinterCallback)  # keep the log dicts (still computed every step) off stdout
    return trainer, interleave


# ------------------------------------------------------------------------------------------------ report


def mean_of(records: list[dict[str, float]], key: str) -> float:
    return statistics.mean(r[key] for r in records)


def summarize(name: str, records: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    steps = [r["step"] for r in records]
    gen_time = sum(r["generate"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    out = {"mean_step_s": statistics.mean(steps), "median_step_s": statistics.median(steps), "best_step_s": min(steps),
           "mean_cpu_s": statistics.mean(r["cpu"] for r in records),
           "tokens_per_cpu_s_gen": tokens / sum(r["generate_cpu"] for r in records),
           "tokens_per_step": tokens / len(records), "tokens_per_s_gen": tokens / gen_time,
           "tokens_per_s_step": tokens / sum(steps)}
    parts = "  ".join(f"{k} {statistics.mean(r[k] for r in records):.3f}s" for k in keys)
    print(f"{name:8s} step mean {out['mean_step_s']:.3f}s  median {out['median_step_s']:.3f}s  "
          f"best {out['best_step_s']:.3f}s  CPU time {out['mean_cpu_s']:.1f}s | {parts}")
    print(f"{'':8s} generated tokens/step {out['tokens_per_step']:.1f} (longest {max(r['T'] for r in records)})  "
          f"tokens/s over generation {out['tokens_per_s_gen']:.1f} (per CPU-second {out['tokens_per_cpu_s_gen']:.1f})  "
          f"whole step {out['tokens_per_s_step']:.1f}  "
          f"accuracy {statistics.mean(r['accuracy'] for r in records):.3f}")
    print(f"{'':8s} per step: " + ", ".join(f"{r['step']:.2f}" for r in records))
    return out


def main() -> None:
    args = parse_args()
    import transformers
    import trl

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu")
    seed_everything(args.seed)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  trl {trl.__version__}  "
          f"threads {torch.get_num_threads()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  device {device}")
    print(f"model {args.model} ({args.dtype})  {args.prompts} prompts x {args.group_size} completions = "
          f"{args.prompts * args.group_size} per RL step  max_new_tokens {args.max_new_tokens}  "
          f"1 warm-up + {args.steps} measured steps each, interleaved (TRL, ponglab, TRL, ...)")
    print(f"load average at start (1/5/15 min): {os.getloadavg()}")

    ponglab = PonglabSide(args, device)
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as out_dir:
        trainer, interleave = build_trl(args, device, ponglab, out_dir)
        # Same prompt tokens on both sides (same tokenizer, same chat template)?
        q = "What is 12 + 34? Answer with just the number."
        trl_ids = trainer._tokenize_prompts([[{"role": "user", "content": q}]])[0][0]
        same = list(trl_ids) == ponglab.agent.policy.encode_prompts([q])[0]
        print(f"prompt token ids identical on both sides: {same} ({len(trl_ids)} tokens)")
        trainer.train()

    print(f"load average at end (1/5/15 min): {os.getloadavg()}")
    trl_rec, pl_rec = interleave.records[1:], ponglab.records[1:]  # drop the warm-up pair
    print(f"\nwarm-up step: TRL {interleave.records[0]['step']:.2f}s, ponglab {ponglab.records[0]['step']:.2f}s "
          f"(not counted)")
    t = summarize("TRL", trl_rec, ["generate", "hf_generate", "reward", "update", "between_steps"])
    p = summarize("ponglab", pl_rec, ["generate", "reward", "update"])
    print(f"\nratio TRL / ponglab: step time mean {t['mean_step_s'] / p['mean_step_s']:.2f}x, "
          f"median {t['median_step_s'] / p['median_step_s']:.2f}x, best {t['best_step_s'] / p['best_step_s']:.2f}x, "
          f"CPU time {t['mean_cpu_s'] / p['mean_cpu_s']:.2f}x; "
          f"generation tokens/s ponglab / TRL {p['tokens_per_s_gen'] / t['tokens_per_s_gen']:.2f}x "
          f"(per CPU-second {p['tokens_per_cpu_s_gen'] / t['tokens_per_cpu_s_gen']:.2f}x); "
          f"update time {mean_of(trl_rec, 'update') / mean_of(pl_rec, 'update'):.2f}x")


if __name__ == "__main__":
    main()
