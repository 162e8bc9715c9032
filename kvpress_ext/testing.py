"""Tiny random models of the six supported architectures, built from configs (no download).

Used by the tests and by benchmarks that need a model of a given shape; ``size="tiny"`` is for unit
tests, other shapes come from :func:`llama_config`'s arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from kvpress_ext.core.adapters import get_adapter

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma3")

#: Sliding window of the tiny Gemma 3 model: short, so that tests cross it with a few dozen tokens.
GEMMA3_TINY_WINDOW = 16


def tiny_config(arch: str, vocab_size: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A small config of ``arch`` with grouped-query attention (GPT-NeoX: no GQA, rotary_pct 0.25; Gemma 3: sliding
    and full-attention layers alternating, sliding first, a 16-token window, a query scaling that is not
    1/sqrt(head_dim), the released models' two RoPE bases)."""
    common = {
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=kv_heads, **common)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=kv_heads, use_sliding_window=False, **common)
    if arch == "qwen3":
        return Qwen3Config(num_key_value_heads=kv_heads, head_dim=hidden // heads, use_sliding_window=False, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common)
    if arch == "gemma3":
        types = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
        rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        return Gemma3TextConfig(num_key_value_heads=kv_heads, head_dim=hidden // heads, query_pre_attn_scalar=24,
                                sliding_window=GEMMA3_TINY_WINDOW, layer_types=types, rope_parameters=rope, **common)
    raise ValueError(f"Unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa", **config_kwargs):
    """A randomly initialised model of ``arch`` in eval mode (deterministic for a given seed)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.generation_config.eos_token_id = None  # random models: never stop early
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < 128), with <pad>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i, ch in enumerate(chr(c) for c in range(32, 127)):
        vocab[ch] = 4 + i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def random_chunks(seed: int = 0, lengths=(9, 13, 6), q_len: int = 5, vocab: int = 128):
    """Seeded random token chunks (one per length) and a question, for A³ tests: ``(chunks, question_ids)``.
    Ids start at 4, above the tiny tokenizer's special tokens."""
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    return chunks, torch.randint(4, vocab, (q_len,), generator=g).tolist()


def flatten(chunks) -> list[int]:
    """The chunks' ids one after another."""
    return [t for chunk in chunks for t in chunk]


class FlashinferStandIn:
    """flashinfer's documented contract, in float64 on the CPU, for tests without a GPU: NHD tensors
    ((tokens, heads, dim)), the (n_queries, n_keys) mask flattened row-major and bit-packed little-endian, GQA by
    head groups. Monkeypatched in place of the ``flashinfer`` module."""

    @staticmethod
    def packbits(x, bitorder="big"):
        import numpy as np

        return torch.from_numpy(np.packbits(x.numpy().astype(np.uint8), bitorder=bitorder))

    @staticmethod
    def single_prefill_with_kv_cache(q, k, v, packed_custom_mask=None, sm_scale=None, **unused):
        import numpy as np

        (nq, heads, _), (nk, kv_heads, _) = q.shape, k.shape
        bits = np.unpackbits(packed_custom_mask.numpy(), bitorder="little")[: nq * nk].reshape(nq, nk)
        group = heads // kv_heads
        kk, vv = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
        scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * sm_scale
        probs = scores.masked_fill(~torch.from_numpy(bits.astype(bool)), float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, vv).to(q.dtype)


@contextmanager
def attention_inputs(model, layers=None):
    """Capture the hidden states entering each attention module (after its input norm), one tensor per forward:
    ``with attention_inputs(model) as inputs: ...`` gives ``inputs[layer]`` as a list. What tests rebuild
    pre-RoPE keys, queries and values from, independently of the cache and of any press."""
    modules = get_adapter(model).attention_modules(model)
    chosen = range(len(modules)) if layers is None else layers
    inputs = {i: [] for i in chosen}

    def grab(i):
        def hook(module, args, kwargs):
            inputs[i].append(kwargs.get("hidden_states", args[0] if args else None).detach())
        return hook

    handles = [modules[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in chosen]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


def middle_layers_on_disk(model, embeddings_too: bool = False) -> dict:
    """A device_map: every decoder layer but the first and last on "disk" (and the input/output embeddings with
    ``embeddings_too``: the first parameter is then on the meta device), everything else on the CPU."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = [names[id(layer)] for layer in get_adapter(model).layers(model)]
    device_map = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if not any(name.startswith(f"{layer}.") for layer in layers):
            device_map[name.rsplit(".", 1)[0]] = "cpu"
    for i, layer in enumerate(layers):
        device_map[layer] = "disk" if 0 < i < len(layers) - 1 else "cpu"
    if embeddings_too:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            device_map[names[id(module)]] = "disk"
    return device_map


def save_tiny_model(arch: str, folder, **config_kwargs):
    """Save a tiny random model (untied embeddings, so each can be placed on its own device) and the tiny
    tokenizer into ``folder``, for code that loads from a path (``load_model``, accelerate's device maps).
    Returns (folder, number of parameters)."""
    from pathlib import Path

    folder = Path(folder)
    model = tiny_model(arch, **config_kwargs)
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


#: short children's-story sentences: a haystack the tiny stories260k model reads like its training text
STORY_SENTENCES = ("Tom had a red ball.", "He played in the park with his dog.", "The sun was warm and the sky was blue.",
                   "Lily liked to bake cakes.", "One day she made a big cake for her mom.", "They ate it under a tree.")


def write_story_haystack(path, repeats: int) -> str:
    """Write the story sentences ``repeats`` times as one haystack file; its path as a string."""
    Path(path).write_text(" ".join(STORY_SENTENCES * repeats))
    return str(path)
