"""llm_bridge.attention: the CPU's written-out grouped-query attention computes what SDPA computes."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from llm_bridge import LMPolicy, byte_tokenizer, tiny_lm
from llm_bridge.attention import NAME, grouped_attention, use_cpu_attention

PROMPTS = ["hi", "What is 37 + 48? Answer with just the number.", "2+2="]


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_attention_matches_sdpa_with_repeated_heads(masked: bool) -> None:
    """9 query heads over 3 key/value heads, a causal block of queries after cached keys, with and without a
    left-padding mask: the same output as SDPA over keys/values repeated to 9 heads, in float64."""
    torch.manual_seed(0)
    B, H, Hkv, T, S, D = 4, 9, 3, 5, 12, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    mask = None
    if masked:
        pad = torch.tensor([0, 2, 5, 1])[:, None] > torch.arange(S)[None, :]  # [B, S] left padding
        mask = (causal[None] & ~pad[:, None, :])[:, None]  # [B, 1, T, S]
    ours, _ = grouped_attention(_Module(), q, k, v, mask, scaling=D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), repeat_kv(k, 3).double(), repeat_kv(v, 3).double(),
        attn_mask=causal if mask is None else mask).transpose(1, 2)
    assert ours.shape == (B, T, H, D)
    assert (ours.double() - ref).abs().max() < 1e-5


def test_policy_uses_it_on_cpu_and_samples_as_sdpa_does() -> None:
    """An LMPolicy on the CPU runs it; in float32 sampling and the training pass agree with SDPA's to float
    rounding (same tokens from the same seed), and sampling and training still agree with each other."""
    tokenizer = byte_tokenizer()
    results = {}
    for impl in ("sdpa", NAME):
        policy = LMPolicy(tiny_lm(tokenizer, seed=0), tokenizer, lora_rank=4)
        assert policy.model.config._attn_implementation == NAME
        policy.model.set_attn_implementation(impl)
        r = policy.generate(policy.encode_prompts(PROMPTS), max_new_tokens=10, num_samples=3,
                            generator=torch.Generator().manual_seed(0))
        results[impl] = (r, policy.evaluate(r).logprobs.detach())
    (r_sdpa, lp_sdpa), (r_ours, lp_ours) = results["sdpa"], results[NAME]
    valid = r_ours.completion_mask.bool()
    assert torch.equal(r_sdpa.completion_ids, r_ours.completion_ids)
    assert (lp_ours - lp_sdpa)[valid].abs().max() < 1e-5
    assert (lp_ours - r_ours.logprobs)[valid].abs().max() < 1e-5


def test_only_sdpa_models_on_cpu_switch() -> None:
    tokenizer = byte_tokenizer()
    model = tiny_lm(tokenizer, seed=0)
    model.set_attn_implementation("eager")  # asked for eager (e.g. to return attention weights): left alone
    assert not use_cpu_attention(model) and model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert use_cpu_attention(model) and model.config._attn_implementation == NAME
