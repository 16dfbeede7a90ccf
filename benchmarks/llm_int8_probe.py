"""Would int8 weights make SmolLM2's sampling faster on a CPU without bfloat16? Speed and faithfulness, measured.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_int8_probe.py

On a CPU without native bfloat16 every forward pass of the LM runs in float32, and sampling (a prompt pass, then
~8 decoding steps per batch) is more than half of an RL step. Two int8 paths that PyTorch ships for the CPU:

  weight-only   int8 weights with a float32 scale per output channel, float32 activations
                (`torch.ops.aten._weight_int8pack_mm`): the same function as float32 weights rounded to the
                int8 grid, so sampling and training could share it exactly
  dynamic       fbgemm's int8 x int8 product (`torch.ao.quantization.quantize_dynamic`, per-channel weights):
                each call also rounds its activations to 8 bits, one scale per tensor

Prints, for the untrained model, the seconds of a prompt pass over rows x 50 tokens and of one cached decoding
step, for float32 and both int8 paths; then how far the dynamic path moves the next-token distribution after
"A + B = " on 16 addition prompts (KL to float32, and how often the argmax is the same), with every linear layer
quantized and with one kind at a time. The answer found on an Ice Lake Xeon (benchmarks/RESULTS.md): the
weight-only kernel is far slower than float32, and the dynamic one is faster but unfaithful (down_proj's inputs
have outliers that one 8-bit scale per tensor cannot hold).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede `import torch`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import random
import time
import warnings

import torch
from torch import nn

from llm_bridge import load_lm

warnings.filterwarnings("ignore")  # torch.ao's deprecation notices


class WeightOnlyInt8(nn.Module):
    """A frozen linear layer as int8 weights [out, in] and a float32 scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.scale = (w.abs().amax(1).clamp_min(1e-12) / 127).contiguous()  # [out]
        self.q = torch.round(w / self.scale[:, None]).to(torch.int8).contiguous()  # [out, in]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.q, self.scale)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def swap_linears(model: nn.Module, make, names: tuple[str, ...] | None = None) -> nn.Module:
    """A copy of `model` with each nn.Linear (or those whose attribute name is in `names`) replaced by make(layer)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (names is None or name in names):
                setattr(module, name, make(child))
    return model


def dynamic(linear: nn.Linear) -> nn.Module:
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)


@torch.no_grad()
def timings(model: nn.Module, rows: int, context: int = 50, steps: int = 4) -> tuple[float, float]:
    """(seconds of a prompt pass over rows x context tokens, median seconds of one cached decoding step)."""
    ids = torch.randint(0, 1000, (rows, context))
    t = time.perf_counter()
    cache = model(ids, use_cache=True).past_key_values
    prefill = time.perf_counter() - t
    per_step = []
    for _ in range(steps):
        t = time.perf_counter()
        cache = model(torch.randint(0, 1000, (rows, 1)), past_key_values=cache, use_cache=True).past_key_values
        per_step.append(time.perf_counter() - t)
    return prefill, sorted(per_step)[len(per_step) // 2]


def main() -> None:
    model, tokenizer = load_lm("smollm2", device="cpu", dtype="float32")
    weight_only = swap_linears(model, WeightOnlyInt8)
    dyn = swap_linears(model, dynamic)
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads; seconds: prompt pass over rows x 50 tokens / "
          "one decoding step")
    print(f"{'rows':>5} {'float32':>16} {'int8 weight-only':>18} {'int8 dynamic':>16}")
    for rows in (1, 8, 16):  # (64 rows: the weight-only kernel takes minutes)
        cells = [timings(m, rows) for m in (model, weight_only, dyn)]
        print(f"{rows:>5} " + " ".join(f"{p:7.3f} / {s:6.4f}".rjust(w) for (p, s), w in zip(cells, (16, 18, 16))),
              flush=True)

    rng = random.Random(0)
    texts = []
    for _ in range(16):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        messages = [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + f"{a} + {b} = ")
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = model(**batch).logits[:, -1].log_softmax(-1)  # [16, V]
    print("\nnext token after 'A + B = ', int8 dynamic against float32 (16 prompts):")
    for names in (None, ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",),
                  ("lm_head",)):
        quantized = dyn if names is None else swap_linears(model, dynamic, names)
        with torch.no_grad():
            logp = quantized(**batch).logits[:, -1].log_softmax(-1)
        kl = (ref.exp() * (ref - logp)).sum(-1)
        same = (ref.argmax(-1) == logp.argmax(-1)).float().mean()
        print(f"  {'every linear layer' if names is None else ', '.join(names):<28} KL mean {kl.mean():.4f} "
              f"max {kl.max():.4f}, same argmax {same:.0%}")


if __name__ == "__main__":
    main()
