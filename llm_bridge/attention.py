"""Attention for the CPU: grouped-query attention in float32, written out, registered with `transformers`.

    use_cpu_attention(model)   # model.config._attn_implementation = "ponglab_cpu" (only for a model on the CPU)

Why not `transformers`' default ("sdpa", torch's `scaled_dot_product_attention`)? The shapes of this lab are
small: a prompt of ~50 tokens, a completion of ~12, SmolLM2's 9 query heads sharing 3 key/value heads. For
them, on 2 CPU cores,
  * the CPU flash-attention kernel's backward pass is slow: forward and backward over [85 rows, 9 heads, 15
    queries, 67 keys] took 41 ms a layer, written-out attention 10 ms (the training pass has 30 layers);
  * `transformers` copies the 3 key/value heads out to 9 (`repeat_kv`) whenever there is a padding mask, which
    there always is with left-padded prompts: a copy of the keys and values a layer, on every decoding pass;
  * a decoding pass over 16 rows spent 0.58 ms a layer in attention, against 0.18 ms here.

Here the 9 query heads are viewed as 3 groups of 3 over their shared key/value head, [B, kv, group x T, D]
(no copy of K or V), the scores and softmax are float32 whatever the model's dtype (under bfloat16 autocast too,
which SDPA's CPU kernel also accumulates in: the same error against a float64 reference, tested), and the output
goes back in the input's dtype. Anything this does not cover (dropout while training, soft-capping, attention
sinks, a position bias) goes to SDPA as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "ponglab_cpu"


def grouped_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """softmax(q k^T * scaling + mask) v for query [B, H, T, D], key/value [B, Hkv, S, D], H = g * Hkv.

    `attention_mask`: SDPA's boolean mask [B or 1, 1, T, S] (True = attend), or None for plain causal attention
    (the last T of the S keys are the queries' own positions). Returns ([B, T, H, D], None), as SDPA's does."""
    unusual = any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    if dropout > 0.0 or unusual or kwargs.get("output_attentions") or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = H // Hkv  # query heads per key/value head
    scale = D ** -0.5 if scaling is None else scaling
    with torch.autocast(query.device.type, enabled=False):  # float32 products, not autocast's bfloat16
        q = query.float().reshape(B, Hkv, g * T, D)  # heads h = kv * g + j, as repeat_kv lays them out
        scores = (q @ key.float().transpose(-1, -2)).view(B, Hkv, g, T, S) * scale  # [B, Hkv, g, T, S]
        if attention_mask is None:  # causal: query t sits at key position S - T + t
            allowed = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
        else:
            allowed = attention_mask.bool()[:, :, None]  # [B or 1, 1, 1, T, S]
        # The most negative float, not -inf: a fully masked row (a left-pad query) gets uniform weights rather
        # than NaN; its output is never read.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1).view(B, Hkv, g * T, S)
        out = (weights @ value.float()).view(B, H, T, D)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks SDPA gets


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch a `transformers` model on the CPU from SDPA to `grouped_attention`; True if it was switched.

    Only models that ran SDPA are switched (one that asked for eager attention, say to return its attention
    weights, keeps it), and only on the CPU: on CUDA, SDPA's fused kernels are the fast ones."""
    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    if config is None or param is None or param.device.type != "cpu":
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(NAME)
    return True
