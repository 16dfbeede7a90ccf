"""Low-rank adapters (LoRA, Hu et al. 2021): train a rank-r correction of each linear layer, freeze the rest.

    y = W x + (alpha / r) * B (A x)          W [out, in] frozen;  A [r, in], B [out, r] trained;  B = 0 at the start

so the adapted model starts as the pretrained one, exactly, and an update moves only r * (in + out) numbers per
layer instead of in * out: for SmolLM2-135M at rank 16, 4.9M trained weights instead of 135M (`add_lora`).

Why a policy-gradient lab wants this:
  * A policy-gradient update carries very little information: a few bits per completion (one scalar reward).
    "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) reports that for RL even rank-1 adapters
    learn as fast as full fine-tuning, at a learning rate ~10x higher (the adapter's scale differs). On
    SmolLM2 and 2-digit addition we measured otherwise (docs/llm.md): they stall lower.
  * The step is cheaper. The backward pass computes no gradient for the frozen weights (for each linear
    layer, one of its two backward matrix products is gone, and so is the dense [vocab, hidden] gradient
    of the embedding table), and AdamW updates 4.9M numbers instead of 135M.
  * The reference policy is the frozen model itself (ponglab still keeps its usual frozen copy). A checkpoint
    holds the adapters alone (`LMPolicy.checkpoint_state`: 19.7 MB at rank 16 for SmolLM2), and a fingerprint
    of the frozen weights that are loaded again from the run's --model.

The scale alpha / r keeps the adapter's output at the same size across ranks for the same learning rate
(A ~ U(+-1/sqrt(in)) so A x has entries of size ~|x|, and Adam moves B by ~lr per step whatever r is).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# Every linear layer of a Llama block (attention and MLP). Adapting the MLP matters: "LoRA Without Regret" finds
# attention-only adapters learn markedly worse. The LM head (tied to the embedding table) stays frozen.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        # The adapters stay float32 whatever the base is: their steps are ~lr, far below bfloat16's resolution.
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        bound = 1.0 / math.sqrt(base.in_features)
        nn.init.uniform_(self.lora_a, -bound, bound)
        self.merged: Tensor | None = None  # W + scale B A [out, in] while sampling (`merged_adapters`)
        # Copies of the frozen W, by kind: "t" (W^T, see `base_t`) and a dtype (W in it, see `forward`); each held
        # with the identity of the W it was copied from.
        self._copies: dict[str | torch.dtype, tuple[tuple, Tensor]] = {}

    def forward(self, x: Tensor) -> Tensor:  # x [..., in] -> [..., out]
        if self.merged is not None and not torch.is_grad_enabled():  # inside `merged_adapters`: sampling
            return nn.functional.linear(x, self.merged, self.base.bias)
        low = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if low is not None and self.base.weight.dtype == torch.float32:
            # Autocast would cast the frozen float32 W to `low` on every call (it caches casts of trained leaves
            # only); a kept copy (270 MB for SmolLM2 in bfloat16) is the same numbers without the 6 bytes of
            # traffic a weight per pass, forward and backward.
            w = self._copy(low, lambda w: w.to(low))
            bias = None if self.base.bias is None else self.base.bias.to(low)
            y = nn.functional.linear(x.to(low), w, bias)
        else:
            y = self.base(x)
        # Two thin products (x A^T: [..., r], then B: [..., out]) rather than forming B A [out, in], so the
        # backward pass is thin too. Under autocast they run in bfloat16 like the base; without it, in the
        # adapters' float32 (a bfloat16 base included).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_a.dtype)
        update = nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)
        return y + update.to(y.dtype) * self.scale

    def base_t(self) -> Tensor:
        """W^T [in, out], contiguous: a copy of the frozen weight (540 MB over SmolLM2's layers in float32), made
        once, for `merged_adapters`.

        The merge is built in the [in, out] layout, and reading W^T contiguously makes it 4x cheaper than reading
        it across the rows of W (0.07 s instead of 0.28 s a call for SmolLM2 on 2 CPU cores). W itself stays
        [out, in]: stored transposed, the training pass got 9-15% slower. The copy is made again if W is replaced
        or written in place by an op that bumps its version (`LMPolicy.load_state_dict` drops it in any case);
        no optimizer step touches W, since it is frozen."""
        return self._copy("t", lambda w: w.t().contiguous())

    def _copy(self, kind: str | torch.dtype, make) -> Tensor:
        """`make(W)`, kept until W is replaced or written in place by an op that bumps its version."""
        w = self.base.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if kind not in self._copies or self._copies[kind][0] != key:
            self._copies.pop(kind, None)  # free the old copy first
            with torch.no_grad():
                self._copies[kind] = (key, make(w.detach()))
        return self._copies[kind][1]

    def drop_copies(self) -> None:
        """Forget the copies of W (a load may have written it in place without bumping its version)."""
        self._copies.clear()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def add_lora(model: nn.Module, rank: int, alpha: float = 32.0, targets: tuple[str, ...] = LLAMA_TARGETS) -> list[nn.Parameter]:
    """Freeze every weight of `model` and wrap each linear layer named in `targets` with a `LoRALinear`.

    Returns the adapters' parameters (the only ones left with requires_grad). The model's outputs are unchanged
    until the adapters train (B = 0). Raises ValueError if no layer matches (a model of another architecture:
    pass its linear layers' names as `targets`)."""
    model.requires_grad_(False)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no linear layer named any of {targets} in {type(model).__name__}: "
                         "LoRA needs the names of its linear layers (targets=...)")
    params: list[nn.Parameter] = []
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(module, rank, alpha)
        setattr(parent, child, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """The adapted layers of a model (empty if it has none)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def merged_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within this block, forward passes without gradients use one merged weight W + scale B A per layer.

    Sampling runs ~10 forward passes per batch with the same adapters; the two thin extra products per layer
    and token cost ~12% of a decoding step on 2 CPU cores (measured: generation 5.84 -> 6.56 s for 8 x 4
    completions), while merging costs one [out, r] x [r, in] product per layer per block. The merge is built on
    entry, from the adapters as they are then, and dropped on exit (it holds a second copy of the weights), so
    no optimizer step can leave it stale. A no-op for a model without adapters.

    `dtype` (the policy's autocast dtype, bfloat16 in mixed precision): store the merged weight in it. Autocast
    casts a float32 weight to bfloat16 on *every* call (it caches casts only of trained leaf tensors), so a
    decoding pass read 4 bytes a weight, wrote 2 and read those 2 again: on 2 CPU cores those casts were 42% of
    a late-run `generate`. Cast once here, the same rounding of the same float32 merge, the passes read 2 bytes
    a weight and compute the same numbers (tested)."""
    layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers:
            w_t = layer.base_t()  # [in, out], contiguous
            # (W + scale B A)^T = W^T + scale A^T B^T, a new contiguous [in, out], used as its [out, in] view:
            # `linear` then multiplies x [M, in] by a row-major [in, out] matrix. Same numbers, but for the few
            # rows of a decoding pass (M = 4-32) the CPU's GEMM runs it 1.5-2.3x faster than against the [out, in]
            # layout (benchmarks/bench_llm_layout.py).
            layer.merged = torch.addmm(w_t.float(), layer.lora_a.t(), layer.lora_b.t(),
                                       alpha=layer.scale).to(dtype or w_t.dtype).t()
    try:
        yield
    finally:
        for layer in layers:
            layer.merged = None
