"""Position tracking (kvpress_ext.core.positions) against plain transformers runs: caches filled elsewhere, inputs
given as embeddings, caller-supplied cache positions and attention masks, padded batches."""

from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.positions import (
    BatchInputError,
    PaddedBatch,
    PositionState,
    cache_length,
    count_positions,
    gather_slots,
    left_aligned,
    next_position,
    padded_batch,
    position_state,
    set_next_position,
    settle,
    track_positions,
)
from kvpress_ext.core.registry import get_press
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.testing import tiny_model

TOL = 1e-5


def _ids(n, seed=0, batch=1):
    return torch.randint(4, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_cache_filled_elsewhere_continues_at_its_length(tiny_models):
    """A cache prefilled outside apply_press gets a state from its length; decoding inside continues there."""
    model = tiny_models["llama"]
    ids, nxt = _ids(9), _ids(2, seed=1)
    with torch.no_grad():
        ref_cache = DynamicCache()
        model(input_ids=ids, past_key_values=ref_cache)
        ref = model(input_ids=nxt, past_key_values=ref_cache).logits
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache)  # no tracking: no state yet
        assert position_state(cache) == PositionState(next_position=9, seen_tokens=9, rotated=False)
        with apply_press(None, model):
            out = model(input_ids=nxt, past_key_values=cache).logits
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    assert next_position(cache) == 11 and position_state(cache).seen_tokens == 11


def test_inputs_given_as_embeddings_are_tracked(tiny_models):
    model = tiny_models["qwen3"]
    ids = _ids(12)
    emb = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        ref_cache = DynamicCache()
        ref = [model(inputs_embeds=emb[:, :8], past_key_values=ref_cache).logits,
               model(inputs_embeds=emb[:, 8:], past_key_values=ref_cache).logits]
        cache = DynamicCache()
        with apply_press(None, model):
            out = [model(inputs_embeds=emb[:, :8], past_key_values=cache).logits,
                   model(inputs_embeds=emb[:, 8:], past_key_values=cache).logits]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert next_position(cache) == 12


def _stream(model, chunks, press, extra=None):
    """Feed ``chunks`` under ``press``; ``extra(cache, chunk)`` adds keyword arguments to each forward."""
    cache, logits = DynamicCache(), []
    with torch.no_grad(), apply_press(press, model):
        for chunk in chunks:
            kwargs = extra(cache, chunk) if extra else {}
            logits.append(model(input_ids=chunk, past_key_values=cache, **kwargs).logits)
    return cache, logits


def test_cache_position_and_mask_from_the_caller_follow_the_compressed_cache(tiny_models):
    """After an eviction the caller's own counts (transformers' generate passes cache_position and an all-ones
    attention_mask that count evicted tokens) must not leak into the forward: the physical index drives the
    causal mask. Chunks of several tokens make the causal mask matter."""
    model = tiny_models["llama"]
    ids = _ids(40, seed=2)
    chunks = [ids[:, i : i + 5] for i in range(0, 40, 5)]
    press = LazyStreamingPress(n_sink=2, window=8, slack=5)
    ref_cache, ref = _stream(model, chunks, press)
    assert position_state(ref_cache).seen_tokens == 40 and ref_cache.get_seq_length() < 20  # tokens were evicted

    def logical(cache, chunk):
        seen = position_state(cache).seen_tokens
        n = chunk.shape[1]
        return {"cache_position": torch.arange(seen, seen + n), "attention_mask": torch.ones(1, seen + n)}

    _, out = _stream(model, chunks, LazyStreamingPress(n_sink=2, window=8, slack=5), extra=logical)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_padding_the_cache_never_saw_is_refused(tiny_models):
    """A mask that marks pads among tokens already cached as an unpadded batch cannot be honoured: one clear error."""
    model = tiny_models["llama"]
    ids = _ids(30, seed=3, batch=2)
    cache = DynamicCache()
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad(), apply_press(LazyStreamingPress(n_sink=2, window=8, slack=4), model):
        model(input_ids=ids[:, :20], past_key_values=cache)  # 20 > cap 14: compacted
        assert cache.get_seq_length() < position_state(cache).seen_tokens
        with pytest.raises(BatchInputError, match=r"^The attention mask marks pads among tokens this cache holds as a batch without "
                                                  r"padding: pass the padded mask from the first forward"):
            model(input_ids=ids[:, 20:], past_key_values=cache, attention_mask=mask)


def test_padded_batch_without_compression_equals_transformers(tiny_models):
    """Nothing evicted: a left-padded batch is tracked and its mask kept, as transformers itself would run it."""
    model = tiny_models["llama"]
    ids = _ids(10, seed=4, batch=2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    step = _ids(1, seed=5, batch=2)
    step_mask = torch.ones(2, 11, dtype=torch.long)
    step_mask[1, :4] = 0
    with torch.no_grad():
        ref_cache = DynamicCache()
        ref = [model(input_ids=ids, attention_mask=mask, past_key_values=ref_cache).logits]
        ref.append(model(input_ids=step, attention_mask=step_mask, past_key_values=ref_cache).logits)
        cache = DynamicCache()
        with apply_press(None, model):
            out = [model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits]
            out.append(model(input_ids=step, attention_mask=step_mask, past_key_values=cache).logits)
    # compare the rows transformers defines: the real tokens of each sequence
    torch.testing.assert_close(out[0][0], ref[0][0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(out[0][1, 4:], ref[0][1, 4:], atol=TOL, rtol=TOL)
    torch.testing.assert_close(out[1], ref[1], atol=TOL, rtol=TOL)
    # and the padding really was used: without the mask the padded row differs
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    assert (unmasked[1, 4:] - ref[0][1, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_positions_are_made_on_the_inputs_device(tiny_models, arch):
    """The hook builds cache_position/position_ids on the device of the inputs, not torch's default device: a
    CPU model run while another default device is set (as a CUDA model runs while the default is the CPU)
    gives the plain run's logits. ("meta" stands in for the other device: this check runs without a GPU.)"""
    model = tiny_models[arch]
    ids = _ids(6, seed=6, batch=2)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # padding: the causal mask is built from cache_position
    with torch.no_grad():
        ref_cache = DynamicCache()
        ref = [model(input_ids=ids, past_key_values=ref_cache, attention_mask=mask[:, :6]).logits]
        ref.append(model(input_ids=ids[:, :1], past_key_values=ref_cache, attention_mask=mask).logits)
        cache = DynamicCache()
        with torch.device("meta"), apply_press(None, model):
            out = [model(input_ids=ids, past_key_values=cache, attention_mask=mask[:, :6]).logits]
            out.append(model(input_ids=ids[:, :1], past_key_values=cache, attention_mask=mask).logits)
    for a, b in zip(out, ref):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a[0], b[0], atol=TOL, rtol=TOL)
        torch.testing.assert_close(a[1, -4:], b[1, -4:], atol=TOL, rtol=TOL)


class _ReplayPress:
    """A press that runs the model itself, as KVzip does: it records the positions each pass of the decoder is given,
    and after the caller's pass replays its last ``replay`` tokens on the same cache, then cuts them off again
    unless ``keep`` (RestoreKV keeps the tokens its extra pass adds)."""

    def __init__(self, replay=5, keep=False):
        self.replay, self.keep, self.given = replay, keep, []

    def press_contract(self):
        return PressContract(runs_model=True, positions_follow_cache=self.keep)

    def forward_hook(self, module, args, kwargs, output):
        return output

    def post_init_from_model(self, model):
        pass

    def __call__(self, model):
        @contextmanager
        def running():
            seen = {}

            def pre_hook(module, args, kwargs):
                seen.setdefault("ids", kwargs["input_ids"])
                seen.setdefault("cache", kwargs["past_key_values"])
                self.given.append(kwargs.get("position_ids"))

            handle = model.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                yield
                cache = seen["cache"]
                n = cache.get_seq_length()
                model.model(input_ids=seen["ids"][:, -self.replay:], past_key_values=cache)
                if not self.keep:
                    cache.crop(n)
            finally:
                handle.remove()

        return running()


@pytest.mark.parametrize("keep", [False, True])
def test_a_press_that_runs_the_model_owns_the_positions_of_its_passes(tiny_models, keep):
    """Inside its context the model takes every position from the cache length (none is given to it), as in kvpress;
    only the caller's tokens advance the position state, and a press that keeps tokens of its own extra pass (its
    contract: positions follow the cache) leaves the next position at the cache length."""
    model, ids = tiny_models["llama"], _ids(12)
    press, cache = _ReplayPress(keep=keep), DynamicCache()
    with torch.no_grad(), apply_press(press, model):
        model.model(input_ids=ids, past_key_values=cache)
    assert press.given == [None, None]  # the caller's pass and the replay: positions are the model's own
    assert cache.get_seq_length() == (17 if keep else 12)
    assert next_position(cache) == (17 if keep else 12) and position_state(cache).seen_tokens == 12


def test_a_press_that_moves_keys_marks_the_cache_rotated_for_good():
    """set_next_position marks the cache rotated by default; a later call that moved no key leaves the mark."""
    cache = DynamicCache()
    set_next_position(cache, torch.tensor(7), rotated=False)
    state = position_state(cache)
    assert state == PositionState(next_position=7, seen_tokens=0, rotated=False)
    assert type(state.next_position) is int  # saved with caches as a number, not a tensor
    set_next_position(cache, 9)
    assert state.rotated and state.next_position == 9
    set_next_position(cache, 4, rotated=False)
    assert state.rotated and state.next_position == 4


def _cache_of_lengths(*lengths):
    cache = DynamicCache()
    for i, n in enumerate(lengths):
        cache.update(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4), i)
    return cache


def test_cache_length_is_the_rounded_mean_over_layers():
    """Presses may keep different counts per layer: the reported length is their mean, rounded; empty is 0."""
    assert cache_length(_cache_of_lengths(3, 4, 6)) == 4  # 13 / 3
    assert cache_length(_cache_of_lengths(5, 6, 6)) == 6  # 17 / 3
    assert cache_length(_cache_of_lengths(10)) == 10
    assert cache_length(DynamicCache()) == 0
    assert cache_length(object()) == 0


def test_left_aligned_marks_the_last_slots_of_each_row():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert left_aligned(mask, 5).tolist() == [[False, False, False, True, True], [False] * 5, [False, True, True, True,
                                                                                                True]]


def test_gather_slots_moves_each_rows_marked_slots_to_its_end_in_order():
    layer = type("Layer", (), {})()
    layer.keys = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 1, 5, 1).expand(2, 1, 5, 3).contiguous()
    layer.values = -layer.keys
    mask = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    gather_slots(layer, mask, 3)
    assert layer.keys.shape == (2, 1, 3, 3) and layer.values.shape == (2, 1, 3, 3)
    assert layer.keys[0, 0, :, 0].tolist() == [0.0, 2.0, 4.0]
    assert layer.keys[1, 0, -1, 0].tolist() == 6.0  # row 1's one marked slot, last
    assert torch.equal(layer.values, -layer.keys)
    assert torch.equal(layer.keys[..., 0], layer.keys[..., 2])  # every channel moved alike


class _Decoder(torch.nn.Module):
    """A decoder stand-in that, like a press running the model, calls itself once more inside its own forward."""

    def __init__(self, inner_calls=1, fail=False):
        super().__init__()
        self.inner_calls, self.fail, self.given = inner_calls, fail, []

    def forward(self, input_ids=None, past_key_values=None, position_ids=None, inner=False):
        self.given.append(position_ids)
        if not inner:
            for _ in range(self.inner_calls):
                self(input_ids=input_ids[:, :2], past_key_values=past_key_values, inner=True)
        if self.fail:
            raise RuntimeError("boom")
        return input_ids


def test_count_positions_counts_only_the_outermost_pass_and_lists_each_cache_once():
    decoder, caches = _Decoder(), []
    cache, other = DynamicCache(), DynamicCache()
    with count_positions(decoder, caches):
        decoder(_ids(5), past_key_values=cache)
        decoder(_ids(3), past_key_values=cache)
        decoder(_ids(4), past_key_values=other)
        decoder(_ids(4))  # no cache: nothing to count
    assert position_state(cache) == PositionState(next_position=8, seen_tokens=8)
    assert position_state(other).seen_tokens == 4
    assert caches == [cache, other] and caches[0] is cache and caches[1] is other
    assert decoder.given == [None] * 8  # the positions stay the model's own
    decoder(_ids(6), past_key_values=cache)  # hooks removed on exit
    assert next_position(cache) == 8


def test_count_positions_keeps_counting_after_a_pass_that_failed():
    decoder, cache = _Decoder(inner_calls=0, fail=True), DynamicCache()
    with count_positions(decoder):
        for n in (3, 4):
            with pytest.raises(RuntimeError, match="boom"):
                decoder(_ids(n), past_key_values=cache)
    assert next_position(cache) == 7  # the failed outer pass closed: the next one is outermost again


def _two_layer_cache(width):
    cache = DynamicCache()
    for i in range(2):
        keys = (torch.arange(2 * width, dtype=torch.float32).reshape(2, 1, width, 1) + 100 * i).expand(2, 1, width, 2)
        cache.update(keys.contiguous(), -keys.contiguous(), i)
    return cache


def test_settle_aligns_every_layer_to_the_same_slots_each_rows_tokens_last():
    """A layer already in place only loses the leading slots no row uses; a layer a press rebuilt is gathered."""
    cache = _two_layer_cache(4)
    pending = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    rebuilt = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    batch = PaddedBatch(rows=[PositionState(), PositionState()], mask=pending[:, :2], pending=pending,
                        compressed={1: rebuilt})
    settle(cache, batch)
    assert batch.mask.tolist() == [[True, True], [False, True]]
    assert batch.pending is None and batch.compressed == {}
    assert [layer.keys.shape[2] for layer in cache.layers] == [2, 2]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert cache.layers[0].values[:, 0, :, 1].tolist() == [[-2.0, -3.0], [-6.0, -7.0]]
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [100.0, 102.0]
    assert cache.layers[1].keys[1, 0, -1, 0].item() == 105.0


def test_settle_keeps_a_layer_in_place_that_needs_no_trim():
    cache = _two_layer_cache(2)
    pending = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)
    before = [(layer.keys, layer.values) for layer in cache.layers]
    settle(cache, PaddedBatch(rows=[PositionState(), PositionState()], mask=pending, pending=pending))
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, before))


def test_layers_that_kept_different_counts_are_refused():
    cache = _two_layer_cache(4)
    pending = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    rebuilt = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    batch = PaddedBatch(rows=[PositionState(), PositionState()], mask=pending, pending=pending, compressed={1: rebuilt})
    with pytest.raises(BatchInputError, match=r"^The press kept a different number of tokens in different layers, "
                                              r"which one attention mask cannot describe: run this press one sequence "
                                              r"at a time \(batch_size=1\)\.$"):
        settle(cache, batch)


def _padded(batch=2, n=10, pad=3, seed=8):
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, :pad] = 0
    return _ids(n, seed=seed, batch=batch), mask


def test_a_padded_batch_cache_changed_outside_is_refused(tiny_models):
    model = tiny_models["llama"]
    ids, mask = _padded()
    cache = DynamicCache()
    with torch.no_grad(), apply_press(None, model):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        cache.crop(8)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        with pytest.raises(BatchInputError, match=r"^The cache of this padded batch holds 8 slots but 10 were recorded: "
                                                  r"it was changed outside kvpress-ext; start a new cache\.$"):
            model(input_ids=ids[:, :1], attention_mask=step_mask, past_key_values=cache)


def test_a_padded_batch_on_layers_of_different_cache_lengths_names_them():
    model = tiny_model("gemma3", layers=4)
    ids, mask = _padded()
    with (torch.no_grad(), apply_press(None, model),
          pytest.raises(BatchInputError, match=r"^Padded batches are not supported on a model whose layers keep caches "
                                               r"of different lengths \(full_attention, sliding_attention\): run one "
                                               r"sequence at a time \(batch_size=1\)\.$")):
        model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache())


def test_input_ids_given_by_position_are_tracked(tiny_models):
    model = tiny_models["llama"]
    ids, nxt = _ids(9), _ids(3, seed=1)
    with torch.no_grad():
        ref_cache = DynamicCache()
        model.model(ids, past_key_values=ref_cache)
        ref = model.model(nxt, past_key_values=ref_cache).last_hidden_state
        cache = DynamicCache()
        with apply_press(None, model):
            model.model(ids, past_key_values=cache)
            out = model.model(nxt, past_key_values=cache).last_hidden_state
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    assert position_state(cache) == PositionState(next_position=12, seen_tokens=12)


def test_a_padded_forward_after_unpadded_tokens_starts_each_sequence_from_the_caches_state(tiny_models):
    """Tokens cached as an unpadded batch, then a press moved the next position: the first padded forward gives each
    sequence a copy of that state (position, tokens seen, rotated) and advances it by its own real tokens."""
    model = tiny_models["llama"]
    ids = _ids(9, seed=9, batch=2)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:7] = 0  # the second sequence's new tokens start with two pads
    cache = DynamicCache()
    with torch.no_grad(), apply_press(None, model):
        model(input_ids=ids[:, :5], past_key_values=cache)
        set_next_position(cache, 3)
        model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=cache)
    rows = padded_batch(cache).rows
    assert rows == [PositionState(next_position=7, seen_tokens=9, rotated=True),
                    PositionState(next_position=5, seen_tokens=7, rotated=True)]
    assert rows[0] is not rows[1]


def test_a_padded_batch_continued_without_a_mask_uses_its_own(tiny_models):
    """After the padded prefill the cache knows each sequence's slots: a step without attention_mask (or with the
    caller's full mask) gives the same logits."""
    model = tiny_models["llama"]
    ids, mask = _padded(seed=10)
    step = _ids(1, seed=11, batch=2)
    logits = []
    for step_mask in (torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1), None):
        cache = DynamicCache()
        with torch.no_grad(), apply_press(None, model):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            with torch.device("meta"):  # another default device: the step's mask is made on the inputs' device
                logits.append(model(input_ids=step, attention_mask=step_mask, past_key_values=cache).logits)
        assert [row.next_position for row in padded_batch(cache).rows] == [11, 8]
        assert position_state(cache).seen_tokens == 11  # every forward counts its tokens, pads included
    torch.testing.assert_close(logits[1], logits[0], atol=TOL, rtol=TOL)


def test_settle_on_a_one_layer_cache_trims_without_a_copy():
    cache = DynamicCache()
    keys = torch.arange(8, dtype=torch.float32).reshape(2, 1, 4, 1)
    cache.update(keys, -keys, 0)
    stored = cache.layers[0].keys
    pending = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    batch = PaddedBatch(rows=[PositionState(), PositionState()], mask=pending[:, :3], pending=pending)
    settle(cache, batch)
    assert batch.mask.tolist() == [[True, True, True], [False, True, True]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    assert cache.layers[0].keys.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()  # a view


def test_a_pad_after_a_real_token_is_refused_even_after_leading_pads(tiny_models):
    model = tiny_models["llama"]
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    with (torch.no_grad(), apply_press(None, model),
          pytest.raises(BatchInputError, match=r"^Padding must be on the left of each sequence: set "
                                               r"tokenizer.padding_side = 'left'\.$")):
        model(input_ids=_ids(4, batch=2), attention_mask=mask, past_key_values=DynamicCache())


class _ConfiglessDecoder(torch.nn.Module):
    """A decoder with no ``config``: it records what the hook hands it and caches one channel per token."""

    def __init__(self):
        super().__init__()
        self.given = []

    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        self.given.append(kwargs)
        if past_key_values is not None:
            keys = input_ids[:, None, :, None].float()
            past_key_values.update(keys, keys, 0)
        return input_ids


def test_a_decoder_without_a_config_runs_a_padded_batch():
    decoder, cache = _ConfiglessDecoder(), DynamicCache()
    ids, mask = _padded(n=5, pad=2)
    with track_positions(decoder):
        decoder(input_ids=ids, attention_mask=mask, past_key_values=cache)
    given = decoder.given[0]
    assert given["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert given["cache_position"].tolist() == [0, 1, 2, 3, 4]
    assert [row.next_position for row in padded_batch(cache).rows] == [5, 3]


def test_a_decoder_without_a_config_runs_unpadded_inputs_and_calls_without_a_cache():
    """Its output has no past_key_values either: the hooks leave such a call alone."""
    decoder, cache = _ConfiglessDecoder(), DynamicCache()
    with track_positions(decoder):
        decoder(input_ids=_ids(4), past_key_values=cache)
        assert decoder.given[0]["position_ids"].tolist() == [[0, 1, 2, 3]] and "attention_mask" not in decoder.given[0]
        ids = _ids(3)
        assert decoder(input_ids=ids) is ids
    assert next_position(cache) == 4


def test_a_padded_batch_ignores_the_callers_cache_position_after_eviction(tiny_models):
    """transformers' generate passes cache positions that count evicted tokens: a padded batch's forward takes the
    physical ones, so the step's logits are those of a step given none."""
    model = tiny_models["llama"]
    ids, mask = _padded(seed=12)
    step = _ids(3, seed=13, batch=2)  # several tokens: the causal mask among them depends on the positions
    logits = []
    for caller_position in (None, torch.arange(10, 13)):
        cache = DynamicCache()
        with torch.no_grad(), apply_press(get_press("knorm", compression_ratio=0.5), model):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            assert cache.get_seq_length() == 5
            extra = {} if caller_position is None else {"cache_position": caller_position}
            logits.append(model(input_ids=step, past_key_values=cache, **extra).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=TOL, rtol=TOL)


def test_a_cache_of_layer_kinds_without_a_mask_builder_is_refused():
    """Layers of different cache lengths need a mask per kind; a kind transformers has no builder for here is an
    error naming the kinds, not a mask built wrongly."""
    decoder = _ConfiglessDecoder()
    decoder.config = type("Config", (), {"layer_types": ["full_attention", "chunked_attention"]})()
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 5, 1), torch.zeros(1, 1, 5, 1), 0)
    cache.update(torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 3, 1), 1)
    with track_positions(decoder), pytest.raises(ValueError, match=r"^Cannot build attention masks for layer types "
                                                                   r"\['chunked_attention', 'full_attention'\] of a "
                                                                   r"compressed cache\.$"):
        decoder(input_ids=_ids(2), past_key_values=cache)
