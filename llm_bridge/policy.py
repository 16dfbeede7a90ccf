"""A language model as an RL policy: sample token sequences, score them, and get per-token log-probs.

An LM answering a prompt is an episode: the state is (prompt, tokens so far), the action is the next
token, the episode ends at the end-of-turn token (or after `max_new_tokens`), and the only reward is
a score of the final text (e.g. "is the last integer the right sum?"). PPO needs just three tensors
per token: the log-prob the *sampler* gave the token (`Rollout.logprobs`), the log-prob the *current*
weights give it (`LMPolicy.evaluate(...).logprobs`, with gradients), and an advantage.

Tensor API (what the RL agent uses; B = batch of sequences, P = prompt length, T = completion length)
------------------------------------------------------------------------------------------------------
    policy  = LMPolicy.from_name("smollm2", value_head=False, reference=True)
    ids     = policy.encode_prompts(["What is 37 + 48? Answer with just the number."] * 8)  # list[list[int]]
    rollout = policy.generate(ids, max_new_tokens=16, temperature=1.0)                     # Rollout
        rollout.prompt_ids      [B, P] long   left-padded with policy.pad_id
        rollout.prompt_mask     [B, P] long   1 = real prompt token
        rollout.completion_ids  [B, T] long   sampled tokens, right-padded with policy.pad_id
        rollout.completion_mask [B, T] long   1 = generated token (incl. the final stop token), 0 after
        rollout.logprobs        [B, T] float  log-prob of each sampled token (0 where mask = 0)
        rollout.finished        [B]    bool   ended by a stop token or stop_text (False = cut by max_new_tokens)
        rollout.texts           list[str]     decoded completions: for the reward checker ONLY
    mb      = rollout[idx]                                      # minibatch (slice / index tensor)
    stats   = policy.evaluate(mb, temperature=1.0, with_entropy=True)    # ONE forward, with grad
        stats.logprobs [B, T], stats.entropy [B, T] | None, stats.values [B, T] | None (value head)
    ratio   = (stats.logprobs - mb.logprobs).exp()              # = 1 on-policy, up to float error
    ref_lp  = policy.ref_token_logprobs(mb)                     # [B, T], frozen initial weights
    kl      = kl_k3(stats.logprobs, ref_lp, mb.completion_mask)  # scalar, >= 0
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6)

Conventions the agent can rely on:
  * Token ids from sampling go straight into training; text is never re-tokenized (re-tokenizing
    "85" may give different ids than were sampled, and then the log-probs are of other actions).
  * Every per-token tensor is exactly 0 where completion_mask == 0, so exp(new - old) = 1 there and
    masked sums never meet inf/NaN. Multiply by the mask (or use `masked_mean`) anyway.
  * values[:, t] is V(prompt + completion[:t]): the value of the state in which token t is chosen,
    read from the same hidden state as the logits of token t. With one reward at the end of the
    sequence and gamma = 1, GAE over the T tokens (masked) is the usual PPO-with-critic recipe.
  * Temperature: `logprobs` are under softmax(logits / temperature), the distribution we sample from
    *before* top-p truncation (the TRL / verl convention). The training pass can recompute exactly
    that with one log_softmax, so the on-policy ratio is 1; a top-p-truncated log-prob would need
    the same truncation set in training, and tokens near the cut would flip in and out of it. With
    top_p = 1 (the default, and what we use for RL) the two are the same thing. Use the same
    temperature in `generate` and `evaluate`.
  * Position ids: with left padding, a token's position is the number of real tokens before it
    (cumsum(mask) - 1), in generation (prompt pass and every cached step) and in `evaluate`.
    RoPE only sees position *differences*, so the trap is the cached steps: completion token t must
    sit at n_real + t, not at the padded length P + t (that would open a gap of P - n_real between
    prompt and answer, and sampling and training would score different sequences).
  * Memory: `evaluate` materializes float32 logits [B, T, V] (V = 49152 for SmolLM2, i.e. 200 KB per
    token): evaluate minibatches of a few thousand tokens at a time (`rollout[idx]`).
  * dtype: float32 gives sampling == training log-probs to ~1e-6. With bfloat16 matmuls (the default on CUDA
    and on CPUs with AVX512-BF16 / AMX) the cached and full forward passes round differently, so expect ratios
    of 1 +- ~1e-2.
  * Mixed precision (that default, `dtype="mixed"`): the weights stay float32 and the forward passes run
    under bfloat16 autocast. Pure bfloat16 weights would not train at RL learning rates: an AdamW step
    moves a weight by about lr = 5e-6, while bfloat16 resolves only ~0.4% of a weight (2^-8 relative;
    ~1e-4 for a typical 0.02), so >90% of the updates round to nothing (`test_mixed_precision_keeps_small_steps`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from agents.common import masked_mean  # the same helper the PPO loss uses
from llm_bridge.attention import use_cpu_attention
from llm_bridge.lora import add_lora, lora_layers, merged_adapters
from llm_bridge.models import load_lm, resolve_device

# Two exact savings, on by default; the switches exist so that benchmarks/bench_llm_update.py can measure each.
SHARE_SAMPLING_NODES = True
"""generate: one forward pass per distinct (prompt, tokens so far), not per row (`LMPolicy._sample_loop`)."""
SHARE_COMPLETION_STEMS = True
"""evaluate: the completion tokens that all rows of a prompt share run once (`_completion_hidden`)."""


@dataclass
class Rollout:
    """A batch of sampled completions (see the module docstring for shapes and conventions)."""

    prompt_ids: Tensor  # [B, P] long, left-padded
    prompt_mask: Tensor  # [B, P] long
    completion_ids: Tensor  # [B, T] long, right-padded
    completion_mask: Tensor  # [B, T] long
    logprobs: Tensor  # [B, T] float32, sampling-time log-probs
    finished: Tensor  # [B] bool
    texts: list[str]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def __getitem__(self, idx: slice | Tensor | Sequence[int]) -> Rollout:
        """Rows `idx` (a slice, an index list/tensor as from torch.randperm, or a bool mask): for minibatches."""
        if isinstance(idx, int):
            raise TypeError("index a Rollout with a slice or a list/tensor of indices (it keeps the batch dim)")
        if isinstance(idx, slice):
            rows = list(range(len(self)))[idx]
        else:
            idx = torch.as_tensor(idx)
            rows = (idx.nonzero().squeeze(-1) if idx.dtype == torch.bool else idx).tolist()
        sel = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return Rollout(
            prompt_ids=self.prompt_ids[sel],
            prompt_mask=self.prompt_mask[sel],
            completion_ids=self.completion_ids[sel],
            completion_mask=self.completion_mask[sel],
            logprobs=self.logprobs[sel],
            finished=self.finished[sel],
            texts=[self.texts[i] for i in rows],
        )

    @staticmethod
    def cat(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
        """One Rollout of the rows of several (e.g. batches sampled by the same weights): prompts left-padded and
        completions right-padded to the widest."""
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        T = max(r.completion_ids.shape[1] for r in rollouts)

        def pad(x: Tensor, width: int, value: float, left: bool) -> Tensor:
            n = width - x.shape[1]
            return F.pad(x, (n, 0) if left else (0, n), value=value)

        return Rollout(
            prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in rollouts]),
            prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in rollouts]),
            completion_ids=torch.cat([pad(r.completion_ids, T, pad_id, False) for r in rollouts]),
            completion_mask=torch.cat([pad(r.completion_mask, T, 0, False) for r in rollouts]),
            logprobs=torch.cat([pad(r.logprobs, T, 0.0, False) for r in rollouts]),
            finished=torch.cat([r.finished for r in rollouts]),
            texts=[t for r in rollouts for t in r.texts],
        )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt_ids, prompt_mask, completion_ids, completion_mask): what `evaluate` needs."""
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(
            *(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.completion_ids,
                                      self.completion_mask, self.logprobs, self.finished)),
            texts=self.texts,
        )


@dataclass
class TokenStats:
    """Per-token outputs of one training forward pass; all [B, T] and 0 where completion_mask == 0."""

    logprobs: Tensor
    entropy: Tensor | None = None  # entropy of softmax(logits / temperature), if asked for
    values: Tensor | None = None  # value-head output, if the policy has a value head


TokenBatch = Rollout | tuple[Tensor, Tensor, Tensor, Tensor]  # a Rollout or its .tensors()


class LMPolicy(nn.Module):
    """A causal LM (+ optional value head, + optional frozen reference copy) as a token-level policy."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        value_head: bool = False,
        reference: bool = False,
        autocast: torch.dtype | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 32.0,
    ) -> None:
        super().__init__()
        self.model = model
        # evaluate(): gradients through the prompt too (exact), or with its keys/values as constants (an approximation).
        self.prompt_grad = True
        # Forward passes (sampling and scoring) run under torch.autocast(autocast) when set: mixed precision.
        self.autocast_dtype = autocast
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; load it with llm_bridge.load_lm (which sets one)")
        self.pad_id: int = tokenizer.pad_token_id
        self.stop_token_ids: list[int] = _stop_ids(model, tokenizer)  # EOS and <|im_end|>
        param = next(model.parameters())
        # Value head: hidden state -> scalar, kept in float32 even when the LM is bf16 (a value
        # target of e.g. 0.73 should not be rounded to 8 bits of mantissa). Small init: V ~ 0 at start.
        self.value_head: nn.Linear | None = None
        if value_head:
            self.value_head = nn.Linear(model.config.hidden_size, 1, device=param.device, dtype=torch.float32)
            nn.init.normal_(self.value_head.weight, std=1e-3)
            nn.init.zeros_(self.value_head.bias)
        # On the CPU, attention as written out in llm_bridge/attention.py (faster than SDPA at these sizes); set
        # before the reference is copied, so that it runs the same attention.
        use_cpu_attention(self.model)
        # Reference model: a frozen copy of the *initial* weights, for a KL penalty / KL logging.
        # It is a registered submodule (moves with .to(), saved in state_dict so a resumed run keeps
        # the same reference) but has requires_grad=False: use trainable_parameters() for optimizers.
        self.ref_model: PreTrainedModel | None = None
        if reference:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # LoRA (llm_bridge.lora): freeze the LM, train low-rank adapters on its linear layers; B = 0, so the policy
        # starts as the model (and the reference above, copied first, is that model without adapters).
        self.lora_rank = lora_rank
        self._head_t: tuple[tuple, Tensor] | None = None  # (weight's identity, W^T) for `_row_major_head`
        if lora_rank:
            add_lora(self.model, lora_rank, lora_alpha)

    @classmethod
    def from_name(
        cls,
        name: str = "smollm2",
        device: str = "auto",
        dtype: str = "auto",
        value_head: bool = False,
        reference: bool = False,
        seed: int = 0,
        lora_rank: int = 0,
        lora_alpha: float = 32.0,
    ) -> LMPolicy:
        """`load_lm(name, device, dtype, seed=seed)` wrapped as a policy.

        dtype: "auto" ("mixed" on CUDA and on CPUs with native bfloat16, else "float32"), "mixed" (float32 weights, bfloat16 autocast),
        or a weights dtype for `load_lm` ("float32", "bfloat16", "float16") with no autocast.
        lora_rank: 0 trains every weight; r > 0 freezes them and trains rank-r adapters (`llm_bridge.lora`)."""
        weights, autocast = policy_precision(dtype, resolve_device(device))
        model, tokenizer = load_lm(name, device=device, dtype=weights, seed=seed)
        return cls(model, tokenizer, value_head=value_head, reference=reference, autocast=autocast,
                   lora_rank=lora_rank, lora_alpha=lora_alpha)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> LMPolicy:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference never trains, not even its dropout
        return self

    def _precision(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast over the float32 weights in mixed precision; a no-op otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _row_major_head(self, dtype: torch.dtype | None = None):
        """While sampling, the LM head multiplies by a contiguous [hidden, vocab] copy of its weight (W^T).

        A decoding pass asks for the logits of a few rows (M = 4-32 nodes x slots), and for so few rows the CPU's
        GEMM runs x @ W^T twice as fast when W^T is stored row-major as [hidden, vocab] than when it is read from
        the [vocab, hidden] weight (16 rows of SmolLM2: 10 ms instead of 22; `benchmarks/bench_llm_layout.py`).
        Same numbers. The copy (113 MB for SmolLM2) is made on every call while the head trains (full fine-tuning:
        a fused AdamW step changes the weight in place without bumping its version, so there is no cheap test
        of "unchanged"), and once while it is frozen (LoRA). `dtype` (the autocast dtype in mixed precision): the copy
        is made in it (57 MB in bfloat16), since autocast would otherwise cast the float32 weight on every pass (see
        `lora.merged_adapters`)."""
        head = self.model.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:  # another kind of head: leave it as it is
            yield
            return
        w = head.weight
        key = (w.data_ptr(), w.dtype, w.device, dtype)
        if w.requires_grad or self._head_t is None or self._head_t[0] != key:
            self._head_t = None  # free the old copy before making the new one
            with torch.no_grad():
                w_t = w.detach().t().to(dtype or w.dtype).contiguous()  # [hidden, vocab]
            self._head_t = None if w.requires_grad else (key, w_t)
        else:
            w_t = self._head_t[1]
        row_major = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        row_major.weight = nn.Parameter(w_t.t(), requires_grad=False)  # [vocab, hidden] view of W^T
        self.model.set_output_embeddings(row_major)
        try:
            yield
        finally:
            self.model.set_output_embeddings(head)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LM weights (or, with LoRA, the adapters) + value head; never the frozen reference."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """The policy for a checkpoint: {"weights": state_dict without the frozen weights, "frozen": fingerprint}.

        Frozen weights (the reference copy, and with LoRA the whole base model) never change: they are what
        `from_name` loads, and a resumed run loads them again. Saving them would add 540 MB per frozen copy of
        SmolLM2 (a full fine-tuning checkpoint was 2.15 GB: LM, reference, AdamW's two moments; a LoRA one was
        mostly frozen weights). In their place goes a fingerprint, per frozen tensor its float64 sum and sum of
        squares, that `load_checkpoint_state` checks against the weights loaded now."""
        state = self.state_dict(keep_vars=True)
        frozen = [k for k, v in state.items() if isinstance(v, nn.Parameter) and not v.requires_grad]
        weights = {k: v.detach() for k, v in state.items() if k not in set(frozen)}
        return {"weights": weights, "frozen": {"keys": frozen, "stats": _fingerprint([state[k] for k in frozen])}}

    def load_state_dict(self, state_dict, *args, **kwargs):
        self._head_t = None  # a load may rewrite even a frozen head in place: drop `_row_major_head`'s copy
        for layer in lora_layers(self.model):  # and the frozen weights of the LoRA base: drop their copies
            layer.drop_copies()
        return super().load_state_dict(state_dict, *args, **kwargs)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Load what `checkpoint_state` wrote (or, from older checkpoints, a full state_dict)."""
        if "weights" not in state:  # a full state_dict (checkpoints before frozen weights were left out)
            self.load_state_dict(state)
            return
        frozen = list(state["frozen"]["keys"])
        current = self.state_dict(keep_vars=True)
        absent = [k for k in frozen if k not in current]
        if absent or not torch.allclose(_fingerprint([current[k] for k in frozen]), state["frozen"]["stats"].double(),
                                        rtol=1e-5, atol=1e-6):
            raise ValueError(
                "the frozen weights of this policy (the reference copy; with LoRA the base model) are not the ones "
                "the checkpoint was trained on" + (f" ({len(absent)} are missing, e.g. {absent[0]})" if absent else "")
                + ". Load the same --model the run was started with (its config.json says which).")
        missing, unexpected = self.load_state_dict(state["weights"], strict=False)
        missing = sorted(set(missing) - set(frozen))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this policy: missing {missing[:3]}, unexpected "
                             f"{list(unexpected)[:3]} (another model or value-head setting than the run's?)")

    # ------------------------------------------------------------------------------------ text <-> ids

    def encode_prompts(self, prompts: Sequence[str], chat: bool = True, system: str | None = None) -> list[list[int]]:
        """Token ids for each prompt. chat=True wraps it as a user turn with the chat template and
        appends the assistant header (add_generation_prompt), so the model answers as the assistant."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string; wrap it: [prompt]")
        out = []
        for prompt in prompts:
            if chat:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}
                ]
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                out.append(self.tokenizer(prompt)["input_ids"])
        return out

    def decode(self, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
        """Completions as text (special tokens such as <|im_end|> dropped): for reward checkers and logs."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def pad_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Left-pad to [B, P] so that every prompt ends in column P-1 and completions line up."""
        if len(prompt_ids) == 0 or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs a non-empty list of non-empty prompts (token id lists)")
        P = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, P - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        stop_token_ids: Sequence[int] | None = None,
        num_samples: int = 1,
        stop_text: Callable[[str], bool] | None = None,
        beam: bool = False,
        beam_min_prob: float = 1e-3,
        draft: int = 0,
    ) -> Rollout:
        """Sample (or greedily decode) up to `max_new_tokens` tokens per prompt, with a KV cache.

        Each sequence stops after its first stop token (default: EOS and <|im_end|>); the batch stops
        when all have. `generator` (on the policy's device) makes sampling reproducible.
        `num_samples` > 1 samples that many completions per prompt (rows i*n .. i*n+n-1 belong to prompt i):
        the prompt pass runs once per distinct prompt and its KV cache is repeated, which saves most of the
        prompt cost of a GRPO-style group.
        `stop_text(text_so_far)` (e.g. `TextGame.answer_done`), if given, is asked after every token about each
        unfinished completion; True ends it there, the token just sampled being its last (as a stop token is).
        `beam=True`: instead of sampling, return for each prompt its `num_samples` most probable *distinct*
        completions, found by beam search under softmax(logits / temperature) (`_beam_loop`).
        `draft` > 0 (sampling only): guess up to that many tokens at a time from the prompt and check the guesses
        in one forward pass (prompt-lookup speculative sampling, exact; `_sample_loop`).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; for argmax decoding use greedy=True")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        stops = torch.as_tensor(list(stop_token_ids or self.stop_token_ids), dtype=torch.long, device=self.device)
        was_training = self.training
        self.eval()
        try:
            with self._precision(), merged_adapters(self.model, self.autocast_dtype), self._row_major_head(self.autocast_dtype):  # see both
                if beam:
                    return self._beam_loop(prompt_ids, max_new_tokens, temperature, stops, num_samples, stop_text,
                                           beam_min_prob)
                return self._sample_loop(prompt_ids, max_new_tokens, temperature, top_p, greedy, generator, stops,
                                         num_samples, stop_text, draft)
        finally:
            self.train(was_training)

    def _sample_loop(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
                     greedy: bool, generator: torch.Generator | None, stops: Tensor,
                     num_samples: int = 1, stop_text: Callable[[str], bool] | None = None, draft: int = 0) -> Rollout:
        """The decoding loop of `generate`: one prompt pass that fills the KV cache, then one forward pass per
        new token (or per few, with `draft`).

        The forward passes run per *node*, not per row: a node is a distinct (prompt, tokens so far), and rows
        that have sampled the same tokens from the same prompt share one (same context, same next-token
        distribution, from which each row still draws its own token). A group's samples of an addition answer
        repeat the question before the sum ("37 + 48 = "), so for most steps 8 nodes stand for 32 rows; a node
        splits when its rows draw different tokens, and finished rows leave the batch. Exact: it changes what
        is computed, not what is sampled.

        `draft` > 0: prompt-lookup speculative sampling. When the last tokens of a node also occur in its prompt,
        the up to `draft` tokens that follow them there are guessed to come next, and fed in the same forward
        pass as the node's token; that pass yields the next-token distribution after each guessed prefix. Each
        row then draws from the first slot; while its draw equals the guess there it goes on to the next slot,
        and it keeps every draw up to and including the first that differs (or the one after the last guess).
        Every kept token is drawn from its exact conditional distribution, so this too changes what is
        computed, not what is sampled (only which uniform draws which token). An answer that echoes the question
        ("37 + 48 = 85") has its 5 echoed tokens after "3" guessed from the prompt: one pass where there were 5.
        A pass over a few tokens costs more than one over one token, though not proportionally, so guessing stops
        for the rest of the call once fewer than half of the guesses seen by the rows have been kept."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if draft < 0:
            raise ValueError(f"draft must be >= 0, got {draft}")
        prompt, prompt_mask = self.pad_prompts(prompt_ids)  # [B0, P], one row per distinct prompt
        # Prompt pass: fill the KV cache, keep only the last position's logits ([B0, 1, V], not [B0, P, V]).
        cache = DynamicCache(config=self.model.config)
        out = _prefill(self.model, prompt, prompt_mask, cache, logits_to_keep=1)
        # logits [N, S, V]: node n's next-token distribution after its context and its first s guessed tokens,
        # guesses [N, S - 1] (n_guess [N] of them real). The nodes start as the B0 prompts, with no guesses.
        logits = out.logits[:, -1:].float()
        guesses = torch.zeros(len(prompt), 0, dtype=torch.long, device=self.device)
        n_guess = torch.zeros(len(prompt), dtype=torch.long, device=self.device)
        node_mask = prompt_mask  # [N, columns] attention mask of each node's keys/values in the cache
        node_len = prompt_mask.sum(-1)  # [N] real tokens in each node's context before its last pass's inputs
        fed = 0  # columns of the cache that the last pass added (0 after the prompt pass)
        B0 = prompt.shape[0]
        node = torch.arange(B0, device=self.device).repeat_interleave(num_samples)  # [B] each row's node
        prompt_lists = [list(p) for p in prompt_ids]
        prompt = prompt.repeat_interleave(num_samples, dim=0)  # [B, P]: rows i*n .. i*n+n-1 are prompt i's
        prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
        B = prompt.shape[0]
        rows_of = torch.arange(B, device=self.device)
        tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)  # [B, T]
        logps = torch.zeros(B, max_new_tokens, device=self.device)
        n_tok = torch.zeros(B, dtype=torch.long, device=self.device)  # tokens so far per row
        done = torch.zeros(B, dtype=torch.bool, device=self.device)  # ended (a stop, stop_text, or the limit)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)  # ended by a stop token or stop_text
        # Guesses seen and kept by the rows so far. Guessing goes on while at least half are kept: a model that
        # does not quote its prompt (SmolLM2 before RL writes "The sum of 37 and 48 is ...") only pays for them.
        guessed = kept_guesses = 0
        while True:
            S = logits.shape[1]
            # Every row draws at every slot of its node ([B, S]); with S = 1, one token per row as in plain sampling.
            slot = (node[:, None] * S + torch.arange(S, device=self.device)).flatten()
            token, logp = _sample(logits.flatten(0, 1), slot, temperature, top_p, greedy, generator)
            token, logp = token.view(B, S), logp.view(B, S)
            # A row keeps its draws up to the first that differs from its node's guess at that slot.
            hit = (token[:, :-1] == guesses[node]) & (torch.arange(S - 1, device=self.device) < n_guess[node, None])
            accepted = hit.long().cumprod(-1).sum(-1)  # [B] guessed tokens drawn in a row
            if S > 1:
                guessed += int(n_guess[node[~done]].sum())
                kept_guesses += int(accepted[~done].sum())
            last = torch.zeros(B, dtype=torch.long, device=self.device)  # [B] slot of each row's last kept draw
            for j in range(S):
                live = (~done & (j <= accepted)).nonzero().squeeze(-1)  # rows that keep their draw at slot j
                if len(live) == 0:
                    break
                tok_j, pos = token[live, j], n_tok[live]
                tokens[live, pos], logps[live, pos] = tok_j, logp[live, j]
                n_tok[live] += 1
                last[live] = j
                stopped = torch.isin(tok_j, stops)
                if stop_text is not None and not bool(stopped.all()):
                    # Decode the rows still open as the reward checker will see them.
                    check = live[~stopped]
                    texts = self.tokenizer.batch_decode([tokens[b, : n_tok[b]].tolist() for b in check.tolist()],
                                                        skip_special_tokens=True)
                    ended = torch.as_tensor([stop_text(text) for text in texts], dtype=torch.bool, device=self.device)
                    stopped[~stopped] = ended
                finished[live[stopped]] = True
                done[live[stopped | (n_tok[live] >= max_new_tokens)]] = True
            if bool(done.all()):
                break
            # The next nodes: distinct (node, guessed tokens kept, token drawn after them) among the open rows.
            open_rows = (~done).nonzero().squeeze(-1)  # [B']
            keys = [node[open_rows], last[open_rows], token[open_rows, last[open_rows]]]
            if not SHARE_SAMPLING_NODES:
                keys.append(open_rows)  # the row in the key: a node per row
            next_nodes, node[open_rows] = torch.unique(torch.stack(keys, dim=1), dim=0, return_inverse=True)
            node[done] = 0  # finished rows read any node's logits; what they draw is never kept
            parent, kept, node_token = next_nodes[:, 0], next_nodes[:, 1], next_nodes[:, 2]  # [N'] each
            if len(parent) != len(node_mask) or bool((parent != torch.arange(len(parent), device=self.device)).any()):
                cache.batch_select_indices(parent)  # keys/values follow their nodes (split, or rows finished)
            node_mask, node_len = node_mask[parent], node_len[parent]
            if fed:
                # Of the last pass's columns (the node's token, then its guesses), a child keeps 1 + its guesses kept.
                node_mask[:, -fed:] *= (torch.arange(fed, device=self.device)[None, :] <= kept[:, None]).long()
                node_len = node_len + kept + 1
            # Guesses for each new node, from its prompt (`_lookup`), no further than the token limit.
            rep = torch.zeros(len(parent), dtype=torch.long, device=self.device).scatter_(
                0, node[open_rows], open_rows)  # [N'] a row of each node
            room = (max_new_tokens - 1 - n_tok[rep]).tolist()
            new_guesses = [
                _lookup(prompt_lists[b // num_samples], tokens[b, : n_tok[b]].tolist(), min(draft, k))
                if draft and 2 * kept_guesses >= guessed else []
                for b, k in zip(rep.tolist(), room)]
            G = max(len(g) for g in new_guesses)
            guesses = torch.zeros(len(parent), G, dtype=torch.long, device=self.device)
            for i, g in enumerate(new_guesses):
                guesses[i, : len(g)] = torch.as_tensor(g, dtype=torch.long)
            n_guess = torch.as_tensor([len(g) for g in new_guesses], dtype=torch.long, device=self.device)
            # One cached pass per node over its token and its guesses, at positions node_len, node_len + 1, ...
            inputs = torch.cat([node_token[:, None], guesses], dim=1)  # [N', 1 + G]
            fed = inputs.shape[1]
            in_use = (torch.arange(fed, device=self.device)[None, :] <= n_guess[:, None]).long()  # [N', 1 + G]
            node_mask = torch.cat([node_mask, in_use], dim=1)
            positions = node_len[:, None] + torch.arange(fed, device=self.device)[None, :]
            out = self.model(input_ids=inputs, attention_mask=node_mask, position_ids=positions, use_cache=True,
                             **cached(self.model, cache))
            logits = out.logits.float()  # [N', 1 + G, V]

        T = int(n_tok.max())
        completion_mask = (torch.arange(T, device=self.device)[None, :] < n_tok[:, None]).long()  # [B, T]
        completion_ids = tokens[:, :T]
        return Rollout(
            prompt_ids=prompt,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logps[:, :T],
            finished=finished,
            texts=self.decode(completion_ids, completion_mask),
        )

    def _beam_loop(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, stops: Tensor,
                   width: int, stop_text: Callable[[str], bool] | None, min_prob: float) -> Rollout:
        """Beam search: the `width` most probable distinct completions of each prompt, rows u*width .. u*width+width-1.

        Each step extends every open hypothesis by its `width` most likely tokens, and each prompt keeps the
        `width` best of those and of its finished hypotheses (by log p(completion so far)). A candidate less
        likely than `min_prob` times the prompt's best is dropped: it would carry no weight, only cost. A prompt
        left with fewer than `width` completions repeats its most likely one to fill its rows; the copies are
        exact duplicates (same tokens), which is how `LMAgent` tells them apart. `logprobs` are per token, as
        in sampling, so a row's log p(completion) is their sum."""
        prompt, prompt_mask = self.pad_prompts(prompt_ids)  # [U, P]
        cache = DynamicCache(config=self.model.config)
        out = _prefill(self.model, prompt, prompt_mask, cache, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # [N, V], one row per open hypothesis; at first the U prompts
        node_mask, node_position = prompt_mask, prompt_mask.sum(-1)  # [N, P + t], [N]
        U = len(prompt)
        # A hypothesis: (score = log p so far, tokens, per-token log-probs, ended by a stop token / stop_text).
        open_hyps: list[list[tuple[float, list[int], list[float]]]] = [[(0.0, [], [])] for _ in range(U)]
        done: list[list[tuple[float, list[int], list[float], bool]]] = [[] for _ in range(U)]
        stop_set, cut = set(stops.tolist()), math.log(min_prob)
        for t in range(max_new_tokens):
            top_lp, top_tok = F.log_softmax(logits / temperature, dim=-1).topk(width, dim=-1)  # [N, width] each
            top_lp, top_tok = top_lp.tolist(), top_tok.tolist()
            n, parents, extended = 0, [], []
            for u in range(U):
                cands = [(h[0], -1, h) for h in done[u]]  # (score, parent node or -1 if finished, hypothesis)
                for score, tokens, lps in open_hyps[u]:
                    cands += [(score + lp, n, (score + lp, tokens + [tok], lps + [lp]))
                              for lp, tok in zip(top_lp[n], top_tok[n])]
                    n += 1
                cands.sort(key=lambda c: -c[0])
                kept = [c for c in cands[:width] if c[0] >= cands[0][0] + cut]
                done[u] = [h for _, parent, h in kept if parent < 0]
                open_hyps[u] = []
                for _, parent, h in kept:
                    if parent >= 0:
                        extended.append((u, parent, h))
            # Which extended hypotheses end here: a stop token, the game's stop_text, or the token limit.
            texts = self.tokenizer.batch_decode([h[1] for _, _, h in extended], skip_special_tokens=True) \
                if stop_text is not None else [None] * len(extended)
            for (u, parent, h), text in zip(extended, texts):
                ended = h[1][-1] in stop_set or (text is not None and stop_text(text))
                if ended or t == max_new_tokens - 1:
                    done[u].append((*h, ended))
                else:
                    open_hyps[u].append(h)
                    parents.append(parent)
            if not parents:
                break
            # Keys/values follow their hypotheses; one cached step per open hypothesis, at position P_real + t.
            parent = torch.as_tensor(parents, dtype=torch.long, device=self.device)
            cache.batch_select_indices(parent)
            node_mask, node_position = node_mask[parent], node_position[parent]
            node_mask = torch.cat([node_mask, node_mask.new_ones(len(parent), 1)], dim=1)
            last = torch.as_tensor([h[1][-1] for hyps in open_hyps for h in hyps], device=self.device)
            out = self.model(input_ids=last[:, None], attention_mask=node_mask,
                             position_ids=(node_position + t)[:, None], use_cache=True, **cached(self.model, cache))
            logits = out.logits[:, -1].float()

        rows = []
        for u in range(U):
            best = sorted(done[u], key=lambda h: -h[0])
            rows += best + [best[0]] * (width - len(best))  # too few worth keeping: repeat the best
        T = max(len(h[1]) for h in rows)
        completion_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros((len(rows), T), dtype=torch.long)
        logprobs = torch.zeros((len(rows), T))
        for i, (_, tokens, lps, _) in enumerate(rows):
            completion_ids[i, :len(tokens)] = torch.as_tensor(tokens)
            completion_mask[i, :len(tokens)] = 1
            logprobs[i, :len(tokens)] = torch.as_tensor(lps)
        completion_ids, completion_mask = completion_ids.to(self.device), completion_mask.to(self.device)
        return Rollout(
            prompt_ids=prompt.repeat_interleave(width, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(width, dim=0),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logprobs.to(self.device),
            finished=torch.as_tensor([h[3] for h in rows], device=self.device),
            texts=self.decode(completion_ids, completion_mask),
        )

    # ------------------------------------------------------------------------------------ scoring

    def evaluate(self, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False,
                 entropy_grad: bool = True) -> TokenStats:
        """Per-token log-probs (and entropy, values) of given completions in ONE forward pass over
        cat(prompt, completion), with gradients. This is the "new log-prob" of the PPO ratio.

        `entropy_grad=False`: the entropy is for logging only (no entropy bonus), so it is computed without a
        graph. Its backward pass is a softmax backward over [tokens, vocab]: early in a run, with ~1,000 trained
        tokens and SmolLM2's 49,152-word vocabulary, the entropy's forward and backward were ~15% of an update."""
        return self._score(self.model, batch, temperature, with_entropy, with_values=self.value_head is not None,
                           entropy_grad=entropy_grad)

    def token_logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> Tensor:
        """[B, T] log-probs of the completion tokens under the current weights (with gradients)."""
        return self.evaluate(batch, temperature).logprobs

    @torch.no_grad()
    def ref_token_logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> Tensor:
        """[B, T] log-probs under the frozen initial weights (needs LMPolicy(..., reference=True))."""
        if self.ref_model is None:
            raise ValueError("this policy has no reference model; build it with LMPolicy(..., reference=True)")
        return self._score(self.ref_model, batch, temperature, with_entropy=False, with_values=False).logprobs

    def _score(self, model: PreTrainedModel, batch: TokenBatch, temperature: float,
               with_entropy: bool, with_values: bool, entropy_grad: bool = True) -> TokenStats:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        prompt_ids, prompt_mask, completion_ids, completion_mask = _unpack(batch)
        with self._precision():
            # h [M, H]: each hidden state that predicts a completion token, once; token t of row b reads h[where[b, t]].
            h, where = _completion_hidden(model.get_decoder(), prompt_ids, prompt_mask, completion_ids,
                                          completion_mask, prompt_grad=self.prompt_grad or not torch.is_grad_enabled())
            logits = model.get_output_embeddings()(h).float()  # [M, V]
        if temperature != 1.0:
            logits = logits / temperature
        log_z = logits.logsumexp(dim=-1)  # [M] log of the softmax normaliser
        logprobs = logits[where, completion_ids] - log_z[where]  # [B, T]
        valid = completion_mask.bool()
        stats = TokenStats(logprobs=torch.where(valid, logprobs, 0.0))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                # H = -sum p log p = log Z - sum p * logits
                entropy = log_z - (logits.softmax(-1) * logits).sum(-1)  # [M]
                stats.entropy = torch.where(valid, entropy[where], 0.0)
        if with_values:
            values = self.value_head(h.float()).squeeze(-1)  # [M]
            stats.values = torch.where(valid, values[where], 0.0)
        return stats


# ---------------------------------------------------------------------------------------- helpers


def _fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """[N, 2] float64: the sum and the sum of squares of each tensor (what `checkpoint_state` keeps of frozen ones)."""
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.float64)
    with torch.no_grad():
        return torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).cpu()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX). Only then is mixed
    precision faster than float32 on it: elsewhere bfloat16 is emulated and slower."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def policy_precision(dtype: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(weights dtype for load_lm, autocast dtype or None) for a policy's `dtype` setting (see from_name)."""
    if dtype == "auto":  # mixed wherever bfloat16 matmuls are native: CUDA, and CPUs with AVX512-BF16 / AMX
        dtype = "mixed" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "float32"
    if dtype == "mixed":
        return "float32", torch.bfloat16
    return dtype, None


def cached(module: nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The KV cache as a keyword argument, under the name `module.forward` takes: `cache` in recent transformers,
    `past_key_values` in older ones. Why not always the old name: 5.2x deprecates it and 5.40 removes it, and a
    forward that takes **kwargs would then swallow it without a word and run without the cache."""
    return {_cache_kwarg(type(module)): cache}


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _prefill(model: nn.Module, ids: Tensor, mask: Tensor, cache: DynamicCache, max_shared: int | None = None,
             embeds: Tensor | None = None, **kwargs):
    """Run left-padded prompts [U, P] into `cache` and return the model's output for the last call.

    Leading columns that every row shares (ids and mask alike: a chat template's system prompt and the task's
    opening words, 27 of the 46 tokens of an addition prompt for SmolLM2) run once, for one row, and their
    keys/values are copied to the U rows; only the rest runs per row. Exact: identical columns give identical
    keys/values, and autograd sums the U rows' gradients back into the one shared pass. The output covers the
    columns of the last call only, P - k of them for a shared prefix of k columns (the last column is always
    among them); `max_shared` caps k, so that the output covers at least the last P - max_shared columns.
    `embeds` [U, P, H], if given, are the input embeddings of `ids`, looked up by the caller (who may have
    looked up other tokens in the same call; see `_completion_hidden`)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [U, P] pads get 0; they are masked anyway
    same = ((ids == ids[:1]) & (mask == mask[:1])).all(dim=0)  # [P] column identical in every row
    k = int(same.long().cumprod(0).sum())  # length of the shared prefix
    if max_shared is not None:
        k = min(k, max_shared)

    def inputs(rows: slice, cols: slice) -> dict[str, Tensor]:
        return {"input_ids": ids[rows, cols]} if embeds is None else {"inputs_embeds": embeds[rows, cols]}

    if len(ids) > 1 and 0 < k < ids.shape[1]:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model  # no logits for the prefix
        decoder(**inputs(slice(0, 1), slice(0, k)), attention_mask=mask[:1, :k], position_ids=positions[:1, :k],
                use_cache=True, **cached(decoder, cache))
        cache.batch_repeat_interleave(len(ids))  # [1, heads, k, d] -> [U, heads, k, d]
        return model(**inputs(slice(None), slice(k, None)), attention_mask=mask, position_ids=positions[:, k:],
                     use_cache=True, **cached(model, cache), **kwargs)
    return model(**inputs(slice(None), slice(None)), attention_mask=mask, position_ids=positions, use_cache=True,
                 **cached(model, cache), **kwargs)


def _completion_hidden(decoder: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                       completion_mask: Tensor, prompt_grad: bool = True) -> tuple[Tensor, Tensor]:
    """The hidden states from which the T completion tokens are predicted (with gradients), each one once:
    (hidden [M, H], where [B, T] long); token t of row b is predicted from hidden[where[b, t]].

    Token t of a completion is predicted from the hidden state one step before it: the last prompt column
    (P-1) for t = 0, completion token t-1 after that. Positions are as in `generate`: a token's position is
    the number of real tokens before it.

    A GRPO batch holds each prompt G times, and the G completions of a prompt often begin alike: an addition
    answer "37 + 48 = 85" repeats the question before the sum, so the G samples share their first ~8 tokens
    and differ, if at all, in the digits. Rather than run each row whole, run each *distinct* prompt once
    together with the longest completion prefix that all its rows share (its "stem"), fill a KV cache, copy
    each stem's keys/values to its rows, and run only the rest of each completion on top. Exact: identical
    tokens in identical contexts have identical hidden states, and autograd sums the rows' gradients back
    into the one shared pass. With 46 prompt tokens, 12 completion tokens of which 8 are shared, and G = 4, it
    is ~3x less compute than one pass over [B, P+T]. A hidden state of the stem pass predicts the same
    position in all of its prompt's rows, so it is returned once (M < B * T), and the caller's LM head and
    softmax over the vocabulary run once for it as well; positions past a row's end are not in `hidden` (their
    `where` points anywhere: mask them).

    All the passes take their input embeddings from one lookup, so that the backward pass builds the
    embedding matrix's gradient once ([V, H] dense: 113 MB for SmolLM2), not once per pass.

    `prompt_grad=False` runs the prompt (all but its last token) without a graph: the same values, but its
    keys and values are constants of the loss, so the gradient flows only through the positions from the last
    prompt token on. Not exact: an approximation that makes the backward pass cost the completions only.
    """
    B, P = prompt_ids.shape
    T = completion_ids.shape[1]
    device = prompt_ids.device
    embed = decoder.get_input_embeddings()
    # Distinct (ids, mask) rows; `inverse` [B] maps each row to its prompt in `distinct` [U, 2P].
    distinct, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(prompt_ids) and prompt_grad:  # nothing shared: one pass over prompt + completion
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=positions).last_hidden_state  # [B, P+T, H]
        H = hidden.shape[-1]
        return hidden[:, P - 1 : P + T - 1].reshape(B * T, H), torch.arange(B * T, device=device).view(B, T)
    U = len(distinct)
    lengths = completion_mask.sum(-1)  # [B] real completion tokens per row
    # The stem of prompt u: the first L_u completion tokens, equal in all its rows. L_u <= (shortest row) - 1,
    # so that the rows' last tokens are predicted by rows of their own (and identical rows share all but none).
    rep = torch.zeros(U, dtype=torch.long, device=device).scatter_(0, inverse, torch.arange(B, device=device))
    agree = (completion_ids == completion_ids[rep[inverse]]) & completion_mask.bool()  # [B, T] vs the u's row
    prefix = agree.long().cumprod(-1).sum(-1)  # [B] tokens equal to the representative row's
    cap = (lengths - 1).clamp(min=0)  # [B]
    stem = torch.minimum(prefix, cap) if SHARE_COMPLETION_STEMS else torch.zeros_like(cap)  # [B]
    stem_u = torch.full((U,), T, dtype=torch.long, device=device).scatter_reduce(0, inverse, stem, "amin")  # [U]
    L = int(stem_u.max())
    stem_b = stem_u[inverse]  # [B]
    # Stem passes [U, P + L]: prompt u as padded (so that the columns all prompts share still line up for
    # `_prefill`), then its stem tokens, right-padded to L. The attention mask skips the padding.
    in_stem = torch.arange(L, device=device)[None, :] < stem_u[:, None]  # [U, L]
    u_ids = torch.cat([prompt_ids[rep], torch.where(in_stem, completion_ids[rep, :L], 0)], dim=1)  # [U, P+L]
    u_mask = torch.cat([prompt_mask[rep], in_stem.long()], dim=1)  # [U, P+L]
    # The rest of each row: its tokens L_u .. n-2 on top of its prompt's stem, predicting tokens L_u+1 .. n-1.
    R = int((lengths - 1 - stem_b).clamp(min=0).max()) if B else 0
    r = torch.arange(R, device=device)  # [R]
    src = (stem_b[:, None] + r[None, :]).clamp(max=T - 1)  # [B, R]
    rest_mask = (stem_b[:, None] + r[None, :] <= lengths[:, None] - 2).long()  # [B, R]
    rest_ids = torch.where(rest_mask.bool(), completion_ids.gather(1, src), completion_ids.new_zeros(()))
    # One embedding lookup for the stem and rest passes: [U*(P+L) + B*R, H].
    emb = embed(torch.cat([u_ids.flatten(), rest_ids.flatten()]))
    H = emb.shape[-1]
    u_emb, rest_emb = emb[: u_ids.numel()].view(U, P + L, H), emb[u_ids.numel():].view(B, R, H)
    cache = DynamicCache(config=decoder.config)
    if prompt_grad or P == 1:
        # Column P-1+t predicts completion token t (t <= L_u): keep those columns out of the shared prefix.
        u_hidden = _prefill(decoder, u_ids, u_mask, cache, max_shared=P - 1,
                            embeds=u_emb).last_hidden_state  # [U, P+L-k, H]
    else:
        # The prompt up to its last token as constants: its keys/values without a graph. The last prompt column
        # (it predicts completion token 0) and the stem run with gradients on top.
        with torch.no_grad():
            _prefill(decoder, u_ids[:, : P - 1], u_mask[:, : P - 1], cache)
        positions = (u_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P+L]
        u_hidden = decoder(inputs_embeds=u_emb[:, P - 1 :], attention_mask=u_mask,
                           position_ids=positions[:, P - 1 :], use_cache=True,
                           **cached(decoder, cache)).last_hidden_state  # [U, 1+L, H]
    # Stem outputs: columns P-1 .. P-1+L_u of prompt u predict its rows' tokens 0 .. L_u; keep those (once each).
    offset = P + L - u_hidden.shape[1]  # the k shared columns are not in u_hidden
    stem_cols = u_hidden[:, P - 1 - offset :]  # [U, L+1, H]
    in_out = torch.arange(L + 1, device=device)[None, :] <= stem_u[:, None]  # [U, L+1]
    stem_slot = in_out.flatten().long().cumsum(0).view(U, L + 1) - 1  # [U, L+1] row of `hidden` (where in_out)
    hidden = stem_cols[in_out]  # [Ms, H]
    t = torch.arange(T, device=device)  # [T]
    where = stem_slot[inverse[:, None], t.clamp(max=L)[None, :]]  # [B, T], right for t <= L_u
    if R == 0:
        return hidden, where
    cache.batch_select_indices(inverse)  # keys/values [U, heads, P+L, d] -> [B, heads, P+L, d]
    attention_mask = torch.cat([u_mask[inverse], rest_mask], dim=1)  # [B, P+L+R]
    positions = u_mask[inverse].sum(-1, keepdim=True) + r[None, :]  # [B, R]
    rest = decoder(inputs_embeds=rest_emb, attention_mask=attention_mask, position_ids=positions,
                   use_cache=True, **cached(decoder, cache)).last_hidden_state  # [B, R, H]
    # Token t > L_u is predicted by rest column t - 1 - L_u.
    rest_slot = len(hidden) + rest_mask.flatten().cumsum(0).view(B, R) - 1  # [B, R] row of `hidden` (where rest_mask)
    rest_col = (t[None, :] - 1 - stem_b[:, None]).clamp(0, R - 1)  # [B, T]
    where = torch.where(t[None, :] <= stem_b[:, None], where, rest_slot.gather(1, rest_col))  # [B, T]
    return torch.cat([hidden, rest[rest_mask.bool()]]), where  # [Ms + Mr, H], [B, T]


def kl_k3_per_token(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token: r - log r - 1 with r = ref/pi.
    Unbiased for tokens sampled from pi, always >= 0, and lower variance than logp - ref_logp."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1.0


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of the k3 KL estimate (scalar; differentiable in logp)."""
    return masked_mean(kl_k3_per_token(logp, ref_logp), mask)


def _lookup(prompt: list[int], completion: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: the up to k tokens that follow, in the prompt, the longest n-gram (n <= max_ngram) that ends
    the completion so far and also occurs in the prompt (its last occurrence there); [] if none does. These are
    guesses of what comes next when an answer quotes its question (`LMPolicy._sample_loop`, `draft`).

    The n-gram has at least 2 tokens, except at the completion's first token: a single token (a space, a digit)
    recurs everywhere, and guesses behind it are mostly wrong, while checking them is not free (on a 2-core CPU a
    pass over 5 tokens costs ~1.5-2x one over 1)."""
    if k < 1 or not completion:
        return []
    for n in range(min(max_ngram, len(completion)), 0 if len(completion) == 1 else 1, -1):
        gram = completion[-n:]
        for start in range(len(prompt) - n - 1, -1, -1):  # an occurrence with at least one token after it
            if prompt[start : start + n] == gram:
                return prompt[start + n : start + n + k]
    return []


def _sample(logits: Tensor, rows: Tensor, temperature: float, top_p: float, greedy: bool,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Pick one token per row from the logits [N, V] of its node (`rows` [B]: each row's node); return
    (token [B], its log-prob [B]).

    The softmax, the cumulative sum and the sort run per node, not per row: the 4 rows of a group that share
    "37 + 48 = " share one distribution, and over a 49k vocabulary those passes cost ~15 ms a decoding step
    for 32 rows. The log-prob is under softmax(logits / temperature), before top-p truncation (module docstring)."""
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)  # [N, V]
    if greedy:
        token = logits.argmax(dim=-1)[rows]
    else:
        probs = logp_all.exp()  # [N, V]
        if top_p < 1.0:
            # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p.
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already >= top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)  # the top token always survives
            token = order[rows, _inverse_cdf(sorted_p, generator, rows)]
        else:
            token = _inverse_cdf(probs, generator, rows)
    return token, logp_all[rows, token]


def _inverse_cdf(weights: Tensor, generator: torch.Generator | None, rows: Tensor | None = None) -> Tensor:
    """One index per row of weights [N, V] (>= 0, any total), drawn with probability weight / row total; with
    `rows` [B], one draw for each entry of `rows`, from weights[rows[b]] (the cumulative sum runs once per row
    of `weights`, however many draws share it).

    Why not torch.multinomial: on the CPU it draws an exponential variate for every one of the V = 49k
    entries (~44 ms per decoding step for 32 rows of SmolLM2, ~15% of the sampling time); this draws one
    uniform per row and finds it in the cumulative sum."""
    cdf = weights.cumsum(-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    B = len(weights) if rows is None else len(rows)
    u = torch.rand((B, 1), generator=generator, device=weights.device, dtype=weights.dtype)  # [B, 1]
    if rows is None:
        target = u * total  # [N = B, 1]
    else:
        # Each node's cdf is searched for every row's uniform ([N, B] searches of log2(V) steps each: nothing
        # next to copying the [B, V] cdf of the rows), and each row keeps the answer from its own node's.
        target = u.T * total  # [N, B]
    # right=True: the first index whose cdf exceeds u, which has weight > 0 (u < total; clamp for rounding).
    index = torch.searchsorted(cdf, torch.minimum(target, total.nextafter(torch.zeros_like(total))), right=True)
    if rows is not None:
        index = index[rows, torch.arange(B, device=weights.device)]  # [B]
    return index.squeeze(-1).clamp(max=weights.shape[-1] - 1)


def _unpack(batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if isinstance(batch, Rollout):
        return batch.tensors()
    if isinstance(batch, (tuple, list)) and len(batch) == 4 and all(isinstance(t, Tensor) for t in batch):
        return tuple(batch)  # type: ignore[return-value]
    raise TypeError(
        "expected a Rollout or a tuple (prompt_ids [B,P], prompt_mask [B,P], completion_ids [B,T], "
        f"completion_mask [B,T]), got {type(batch).__name__}"
    )


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the tokenizer and generation config, plus the chat end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if not ids:
        raise ValueError("tokenizer has no EOS token; pass stop_token_ids to generate()")
    return sorted(ids)
