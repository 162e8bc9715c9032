"""Selective-recompute fusion of separately cached chunks (CacheBlend, A3).

Sequence layout (global positions = row index in the fused cache)::

    [ prefix (P) | chunk 0 | chunk 1 | ... | question (Q) ]

1. Load every chunk's K/V and write them after the prefix's into a cache allocated once with room for the
   question, each chunk's keys rotated from its local positions (P + j) to its global ones (all layers of a
   chunk in one operation).
2. Run the decoder layer by layer with our own loop over the model's sub-modules (norms, projections
   through the adapter, :mod:`.attention` with an explicit mask, output projection, MLP), for an
   *active* set of tokens only:

   * layers below ``selection_layer``: all document tokens and the question (full recompute);
   * at ``selection_layer``: fresh K/V are computed for all active tokens, the strategy scores the
     document tokens and keeps the top ``budget(rate, n_doc)``; from here on the active set is the
     selected tokens plus the question;
   * later layers: only active tokens are recomputed; their queries attend causally (by global
     position) to every key, and their new K/V replace the stale ones. Inactive tokens keep their
     re-aligned chunk K/V.

   The prefix is never recomputed (its cache is exact). The question is always recomputed.
3. The result is a DynamicCache of all P + N + Q tokens (question included, next position P + N + Q)
   and the logits of the question tokens. At ``rate=1`` every token is recomputed in every layer, so
   the result equals a full prefill of the concatenated sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.devices import execution_device, input_device, layer_devices
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.rope import shift_into
from kvpress_ext.presses.a3 import selection as sel
from kvpress_ext.presses.a3.attention import attention_probs, masked_attention
from kvpress_ext.storage.chunk_store import ChunkKV


@dataclass
class FusionResult:
    cache: DynamicCache
    logits: torch.Tensor  # (Q, vocab): next-token logits at each question token
    selected: torch.Tensor  # document-token indices (0..N-1) recomputed after the selection layer
    n_prefix: int
    chunk_lengths: list[int]
    #: ``realign_s``: reading the chunk tensors (safetensors maps files lazily, so the disk or page-cache
    #: reads happen here) + rotating keys to global positions + concatenating
    timings: dict = field(default_factory=dict)
    #: per layer, the normed attention input of all P + N + Q rows (zeros where not recomputed), when
    #: ``record_inputs=True`` (an eviction press scores from them)
    layer_inputs: list | None = None


# --- layer internals, reached through the adapter and the standard sub-module names -------------------------
def _identity(x):
    return x


def _layer_parts(layer, adapter):
    """attention, its input norm, the MLP's input norm, the MLP, parallel residual, and the norms on the attention and
    MLP outputs (Gemma 3's "sandwich" norms; identity elsewhere: there post_attention_layernorm is the MLP's input)."""
    attn = adapter.attention(layer)
    parallel = bool(getattr(layer, "use_parallel_residual", False))
    if hasattr(layer, "pre_feedforward_layernorm"):
        return (attn, layer.input_layernorm, layer.pre_feedforward_layernorm, layer.mlp, parallel,
                layer.post_attention_layernorm, layer.post_feedforward_layernorm)
    return attn, layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, parallel, _identity, _identity


def _out_proj(attn):
    return attn.o_proj if hasattr(attn, "o_proj") else attn.dense


def _final_norm(decoder):
    return decoder.norm if hasattr(decoder, "norm") else decoder.final_layer_norm


def _rope_groups(adapter, model, idx: list[int]) -> list[tuple[slice, int]]:
    """Runs of consecutive rows of ``idx`` (layer numbers) that share one RoPE base, as (row slice, a layer of
    it): one rotation for all layers of a Llama-shaped model, one per run on Gemma 3 (two bases)."""
    groups: list[tuple[slice, int]] = []
    start = 0
    for j in range(1, len(idx) + 1):
        if j == len(idx) or not torch.equal(adapter.inv_freq(model, layer=idx[j]),
                                            adapter.inv_freq(model, layer=idx[start])):
            groups.append((slice(start, j), idx[start]))
            start = j
    return groups


def realign(model, prefix: ChunkKV | None, chunks: list[ChunkKV], device=None, dtype=None, extra_rows: int = 0,
            devices=None):
    """Prefix and chunk K/V written into one cache per device, each chunk's keys moved to global positions.

    Returns (keys, values): lists over layers of (1, KVH, P + N + extra_rows, d) views (the last ``extra_rows``
    rows zero: room for the question). Layers go to ``devices[i]`` when given, else all to ``device`` (default:
    where the stored tensors are). Each chunk is rotated and copied once for all the layers on a device.
    """
    adapter = get_adapter(model)
    n_layers = len(adapter.layers(model))
    entries = ([prefix] if prefix is not None else []) + list(chunks)
    if not entries:
        raise ValueError("realign needs a prefix or at least one chunk.")
    first_keys = entries[0].stacked()[0]
    dtype = dtype or first_keys.dtype
    devices = list(devices) if devices is not None else [device or first_keys.device] * n_layers
    total = sum(len(e) for e in entries) + extra_rows
    keys, values = [None] * n_layers, [None] * n_layers
    for dev in dict.fromkeys(devices):  # each distinct device, in layer order
        idx = [i for i, d in enumerate(devices) if d == dev]
        pick = None if idx == list(range(n_layers)) else torch.tensor(idx)
        rope_groups = _rope_groups(adapter, model, idx)
        _, kvh, _, hd = first_keys.shape
        kbuf = torch.empty(len(idx), kvh, total, hd, device=dev, dtype=dtype)
        vbuf = torch.empty(len(idx), kvh, total, entries[0].stacked()[1].shape[-1], device=dev, dtype=dtype)
        offset = 0
        for e in entries:
            k, v = e.stacked()
            if pick is not None:
                k, v = k[pick], v[pick]
            k = k.to(device=dev, dtype=dtype, non_blocking=True)
            n = k.shape[-2]
            dst = kbuf[:, :, offset : offset + n]
            if e.prefix_len == offset:
                dst.copy_(k)
            else:  # every key of the chunk moves by the same distance, with its own layer's RoPE base
                shift = offset - e.prefix_len
                local = torch.arange(e.prefix_len, e.prefix_len + n, device=k.device)
                for rows, layer in rope_groups:
                    if dtype == torch.float32:  # rotate in place
                        shift_into(dst[rows], k[rows], shift, adapter.inv_freq(model, layer=layer))
                    else:  # half precision: rotate in float32, round once
                        dst[rows].copy_(adapter.rerotate_keys(model, k[rows], local, local + shift, layer=layer))
            vbuf[:, :, offset : offset + n] = v.to(device=dev, dtype=dtype, non_blocking=True)
            offset += n
        kbuf[:, :, offset:] = 0
        vbuf[:, :, offset:] = 0
        for j, i in enumerate(idx):
            keys[i], values[i] = kbuf[j : j + 1], vbuf[j : j + 1]
    return keys, values


def _select(strategy, *, layer_idx, attn, adapter, model, x_norm, active, q_all, k_full, v_new, v_old, n_prefix,
            n_doc, n_question, k_budget, pool_width, sink_positions, surprisal, chunk_lengths, seed, scale, window=None):
    """Document-token indices to keep recomputing (sorted), for one strategy."""
    if strategy == "full":
        return torch.zeros(0, dtype=torch.long)
    if strategy == "cat":
        return torch.tensor([n_doc - 1]) if n_doc else torch.zeros(0, dtype=torch.long)
    if strategy == "random":
        return sel.random_tokens(n_doc, k_budget, seed)
    if strategy == "surprisal_chunk":
        return sel.surprisal_chunk(surprisal, chunk_lengths, k_budget)
    doc_rows = slice(0, n_doc)  # active == all doc + question at the selection layer
    if strategy == "blend":
        return sel.top_k(sel.value_deviation(v_new[:, :, doc_rows], v_old), k_budget)
    total = n_prefix + n_doc + n_question
    key_pos = torch.arange(total, device=k_full.device)
    if strategy == "debug":
        rows = torch.arange(n_doc, n_doc + n_question)
        forced = None
    else:  # attnlink
        sinks = torch.as_tensor(sink_positions, dtype=torch.long)
        if sinks.numel() == 0:
            raise PressParameterError("strategy='attnlink' needs sink_positions (global token indices).")
        if int(sinks.min()) < n_prefix or int(sinks.max()) >= total:
            raise PressParameterError(
                f"attnlink sink_positions must lie in [{n_prefix}, {total}) (document or question tokens; the "
                f"prefix is not recomputed), got {sinks.tolist()}."
            )
        rows = sinks - n_prefix  # active index = global position - prefix
        in_doc = rows[rows < n_doc]
        forced = in_doc
    q_pos = active[rows].to(k_full.device)
    probs = attention_probs(q_all[:, :, rows.to(q_all.device)], k_full, q_pos, key_pos, scale, window)
    scores = sel.attention_relevance(probs, slice(n_prefix, n_prefix + n_doc), pool_width)
    return sel.top_k(scores.cpu(), k_budget, forced=None if forced is None else forced.cpu())


@torch.no_grad()
def fuse_chunks(
    model,
    prefix: ChunkKV | None,
    chunks: list[ChunkKV],
    question_ids: list[int],
    *,
    strategy: str = "blend",
    rate: float = 0.15,
    selection_layer: int = 1,
    pool_width: int = 5,
    sink_positions=None,
    seed: int = 0,
    attention_backend: str = "auto",
    record_inputs: bool = False,
) -> FusionResult:
    """Fuse stored chunk caches with a question by selective recompute (see module docstring)."""
    if not question_ids:
        raise ValueError("fuse needs at least one question token (its logits are what fusion returns).")
    adapter = get_adapter(model)
    decoder = adapter.decoder(model)
    layers = adapter.layers(model)
    device = input_device(model)  # layers may sit on other devices (device_map): each step moves to its layer's
    devices = layer_devices(model)
    dtype = next(model.parameters()).dtype
    if not 0 <= selection_layer < len(layers):
        raise PressParameterError(f"selection_layer={selection_layer} must be in [0, {len(layers)}).")

    n_prefix = len(prefix) if prefix is not None else 0
    lengths = [len(c) for c in chunks]
    n_doc, n_q = sum(lengths), len(question_ids)
    total = n_prefix + n_doc + n_q
    t0 = time.perf_counter()
    keys, values = realign(model, prefix, chunks, dtype=dtype, extra_rows=n_q, devices=devices)
    realign_s = time.perf_counter() - t0
    shape = adapter.shape(model)
    doc_ids = [t for c in chunks for t in c.token_ids]
    ids = torch.tensor([doc_ids + list(question_ids)], device=device)
    active = torch.arange(n_prefix, total, device=device)  # global positions of the active tokens
    hidden = model.get_input_embeddings()(ids)
    k_budget = sel.budget(rate, n_doc)
    selected = torch.arange(n_doc)
    key_pos = torch.arange(total, device=device)
    inputs = []
    surprisal = [c.surprisal for c in chunks] if strategy == "surprisal_chunk" else None

    for li, layer in enumerate(layers):
        dev = devices[li]
        hidden, active, key_pos = hidden.to(dev), active.to(dev), key_pos.to(dev)
        attn, ln1, ln2, mlp, parallel, post_attn, post_mlp = _layer_parts(layer, adapter)
        scale = float(getattr(attn, "scaling", shape.head_dim ** -0.5))
        x = ln1(hidden)
        q = adapter.apply_rope(model, adapter.prerope_queries(attn, x), active, layer=li)
        k = adapter.apply_rope(model, adapter.prerope_keys(attn, x), active, layer=li)
        window = adapter.sliding_window(model, li)
        v = adapter.values(attn, x)
        if record_inputs:
            full_x = x.new_zeros(1, total, x.shape[-1])
            full_x[:, active] = x
            inputs.append(full_x)
        if li == selection_layer and strategy == "blend":  # the stored values, before this layer overwrites them
            old_v = values[li][:, :, n_prefix : n_prefix + n_doc].clone()
        else:
            old_v = None
        keys[li][:, :, active] = k.to(keys[li].dtype)
        values[li][:, :, active] = v.to(values[li].dtype)
        if li == selection_layer:
            selected = _select(
                strategy, layer_idx=li, attn=attn, adapter=adapter, model=model, x_norm=x, active=active, q_all=q,
                k_full=keys[li], v_new=v, v_old=old_v, n_prefix=n_prefix, n_doc=n_doc, n_question=n_q,
                k_budget=k_budget, pool_width=pool_width, sink_positions=sink_positions, surprisal=surprisal,
                chunk_lengths=lengths, seed=seed, scale=scale, window=window,
            ).to(torch.long).cpu()
            keep = torch.cat([selected, torch.arange(n_doc, n_doc + n_q)]).to(dev)
            active, hidden, q, x = active[keep], hidden[:, keep], q[:, :, keep], x[:, keep]
        out = masked_attention(q, keys[li], values[li], active, key_pos, scale, attention_backend, window)
        out = post_attn(_out_proj(attn)(out.transpose(1, 2).reshape(1, active.numel(), -1)))
        if parallel:
            hidden = hidden + out + mlp(ln2(hidden))
        else:
            hidden = hidden + out
            hidden = hidden + post_mlp(mlp(ln2(hidden)))

    norm, head = _final_norm(decoder), model.get_output_embeddings()
    hq = norm(hidden[:, -n_q:].to(execution_device(norm)))
    logits = head(hq.to(execution_device(head)))[0]
    cache = DynamicCache()
    for i in range(len(layers)):  # hand the rows over as they are (update() would copy them once more)
        cache.update(keys[i][..., :0, :], values[i][..., :0, :], i)
        cache.layers[i].keys, cache.layers[i].values = keys[i], values[i]
    state = position_state(cache)
    state.next_position = state.seen_tokens = total
    return FusionResult(cache, logits, selected, n_prefix, lengths, timings={"realign_s": realign_s},
                        layer_inputs=inputs if record_inputs else None)
