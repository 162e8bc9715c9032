"""Chunked prefill (kvpress_ext.core.chunked_prefill): a prefill-only press compresses after every chunk and keeps a
fraction of all tokens seen so far; the chunk size is checked; presses that stream by themselves run as they are."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from kvpress import DecodingPress, KnormPress, StreamingLLMPress
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.chunked_prefill import (
    EveryChunkPress,
    PrefillChunkError,
    check_prefill_chunk_size,
    press_for_chunks,
)
from kvpress_ext.core.contract import PressContract, contract_of
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.temporal_order import TemporalOrderPress
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress


def test_ratio_mode_says_how_the_ratio_is_applied():
    assert EveryChunkPress(press=KnormPress(0.5)).ratio_mode == "keep (1-r) of seen tokens"
    assert EveryChunkPress(press=KnormPress(0.5), keep_fraction_of_seen=False).ratio_mode == \
        "press rule applied per chunk"
    assert EveryChunkPress(press=LazyStreamingPress(n_sink=2, window=8)).ratio_mode == "press rule applied per chunk"


def test_the_wrapper_compresses_at_every_prefill_chunk_with_the_inner_contract():
    inner = LazyStreamingPress(n_sink=2, window=8)
    contract = EveryChunkPress(press=inner).press_contract()
    assert contract == PressContract(prefill=True, decoding=False, runs_model=False, whole_cache=True,
                                     positions_follow_cache=contract_of(inner).positions_follow_cache,
                                     budget_parameters=contract_of(inner).budget_parameters, chunked_prefill=True,
                                     batches=contract_of(inner).batches)
    assert EveryChunkPress(press=KnormPress(0.5)).press_contract().batches == contract_of(KnormPress(0.5)).batches


def _feed(model, press, sizes, seed=0):
    """Feed chunks of ``sizes`` tokens under ``press``; the cache length after each chunk."""
    ids = torch.randint(4, 120, (1, sum(sizes)), generator=torch.Generator().manual_seed(seed))
    cache, lengths, start = DynamicCache(), [], 0
    with torch.no_grad(), apply_press(press, model):
        for n in sizes:
            model(input_ids=ids[:, start : start + n], past_key_values=cache)
            start += n
            lengths.append(cache.get_seq_length())
    return lengths


def test_every_chunk_keeps_a_fraction_of_all_tokens_seen(tiny_models):
    """Cumulative mode: after each chunk the cache holds round((1 - r) * seen) entries, and the inner press's ratio
    is back to r after every forward."""
    press = EveryChunkPress(press=KnormPress(compression_ratio=0.25))
    assert _feed(tiny_models["llama"], press, [10, 10, 7, 1]) == [8, 15, 20, 21]  # 7.5, 15, 20.25, 21
    assert press.press.compression_ratio == 0.25


def test_per_chunk_mode_applies_the_press_ratio_to_the_current_cache(tiny_models):
    press = EveryChunkPress(press=KnormPress(compression_ratio=0.5), keep_fraction_of_seen=False)
    assert _feed(tiny_models["llama"], press, [10, 10, 4]) == [5, 7, 5]  # int(15 / 2), int(11 / 2)


def test_ratio_zero_keeps_every_token(tiny_models):
    assert _feed(tiny_models["llama"], EveryChunkPress(press=KnormPress(compression_ratio=0.0)), [6, 6]) == [6, 12]


def test_reset_restores_the_target_ratio_and_resets_the_inner_press():
    press = EveryChunkPress(press=KnormPress(compression_ratio=0.5))
    press.press.compression_ratio = 0.9
    press.reset()
    assert press.press.compression_ratio == 0.5
    plain = EveryChunkPress(press=KnormPress(compression_ratio=0.5), keep_fraction_of_seen=False)
    plain.press.compression_ratio = 0.9
    plain.reset()
    assert plain.press.compression_ratio == 0.9  # per-chunk mode never changes the ratio, so reset leaves it

    class Counting(KnormPress):
        """Its own compress: not wrapped in TemporalOrderPress, so its reset is the inner press's."""

        resets = 0

        def compress(self, *args):
            return super().compress(*args)

        def reset(self):
            self.resets += 1

    counting = EveryChunkPress(press=Counting(compression_ratio=0.5), keep_fraction_of_seen=False)
    counting.reset()
    assert counting.press.resets == 1


@pytest.mark.parametrize("chunk", [True, 0, 41, -1, 2.5, "8"])
def test_a_chunk_size_that_is_not_a_whole_count_within_the_context_is_refused(chunk):
    with pytest.raises(PrefillChunkError, match=rf"^prefill_chunk_size={chunk!r} is invalid: give an integer from 1 "
                                                r"to the context's length \(40 tokens\), or leave it out to prefill "
                                                r"in one pass\.$"):
        check_prefill_chunk_size(chunk, 40)


@pytest.mark.parametrize("chunk", [None, 1, 40])
def test_a_chunk_size_from_one_to_the_context_length_is_accepted(chunk):
    check_prefill_chunk_size(chunk, 40)


class _RunsModel(KnormPress):
    def press_contract(self):
        return PressContract(runs_model=True)


def test_which_press_runs_the_chunks():
    """A prefill-only press is wrapped (in token order); a press that compresses as tokens arrive runs as it is; a
    press that runs the model itself is refused; no chunking or no press: unchanged."""
    knorm = KnormPress(compression_ratio=0.5)
    wrapped = press_for_chunks(knorm, 8)
    assert isinstance(wrapped, EveryChunkPress) and isinstance(wrapped.press, TemporalOrderPress)
    assert wrapped.press.press is knorm
    assert press_for_chunks(knorm, None) is knorm and press_for_chunks(None, 8) is None
    lazy = LazyStreamingPress(n_sink=2, window=8)
    decoding = DecodingPress(base_press=KnormPress(0.0), compression_interval=4, target_size=8)
    assert press_for_chunks(lazy, 8) is lazy and press_for_chunks(decoding, 8) is decoding
    streaming = StreamingLLMPress(compression_ratio=0.5)
    assert isinstance(press_for_chunks(streaming, 8), EveryChunkPress)
    with pytest.raises(PrefillChunkError, match=r"^_RunsModel runs the model itself on the whole context: leave "
                                                r"prefill_chunk_size out for it\.$"):
        press_for_chunks(_RunsModel(compression_ratio=0.5), 8)


@dataclass
class _Recording(KnormPress):
    """Records what its hook is handed (and the ratio set at that moment) instead of compressing."""

    def __post_init__(self):
        super().__post_init__()
        self.calls, self.model = [], None

    def compress(self, *args):  # its own compress: not wrapped in TemporalOrderPress
        return super().compress(*args)

    def post_init_from_model(self, model):
        self.model = model

    def forward_hook(self, module, input, kwargs, output):
        self.calls.append((module, input, kwargs, output, self.compression_ratio))
        return "compressed"


def _cache_of(*lengths, seen):
    cache = DynamicCache()
    for i, n in enumerate(lengths):
        cache.update(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), i)
    position_state(cache).seen_tokens = seen
    return cache


def test_the_inner_press_gets_the_model_and_the_hooks_arguments_with_a_chunk_relative_cache_position():
    press = EveryChunkPress(press=_Recording(compression_ratio=0.5))
    press.post_init_from_model("the model")
    assert press.press.model == "the model"
    module, args, output = SimpleNamespace(layer_idx=1), ("input",), ("output",)
    cache = _cache_of(4, 10, seen=10)
    kwargs = {"hidden_states": torch.zeros(1, 3, 2), "past_key_values": cache, "cache_position": torch.arange(7, 10)}
    with torch.device("meta"):  # another default device: the positions follow the hidden states' device
        assert press.forward_hook(module, args, kwargs, output) == "compressed"
    got_module, got_args, got_kwargs, got_output, ratio = press.press.calls[0]
    assert got_module is module and got_args is args and got_output is output
    assert got_kwargs["cache_position"].device.type == "cpu"
    assert got_kwargs["cache_position"].tolist() == [0, 1, 2] and kwargs["cache_position"].tolist() == [7, 8, 9]
    assert ratio == pytest.approx(1 - 5.5 / 10)  # layer 1's 10 entries down to 5 of 10 seen
    assert press.press.compression_ratio == 0.5  # set back at once, not only when the press is reset
    plain = EveryChunkPress(press=_Recording(compression_ratio=0.5), keep_fraction_of_seen=False)
    assert plain.forward_hook(module, args, kwargs, output) == "compressed"
    assert plain.press.calls[0][1] is args and plain.press.calls[0][4] == 0.5


def test_a_module_without_a_layer_index_is_sized_by_the_first_layer():
    press = EveryChunkPress(press=_Recording(compression_ratio=0.5))
    kwargs = {"hidden_states": torch.zeros(1, 2, 2), "past_key_values": _cache_of(10, 4, seen=10)}
    press.forward_hook(SimpleNamespace(), (), kwargs, None)
    assert press.press.calls[0][4] == pytest.approx(1 - 5.5 / 10)


@pytest.mark.parametrize("lengths, seen", [((5,), 10), ((4,), 10)], ids=["at the target", "below it"])
def test_a_cache_at_or_below_its_target_is_not_compressed(lengths, seen):
    press = EveryChunkPress(press=_Recording(compression_ratio=0.5))
    kwargs = {"hidden_states": torch.zeros(1, 2, 2), "past_key_values": _cache_of(*lengths, seen=seen)}
    assert press.forward_hook(SimpleNamespace(layer_idx=0), (), kwargs, "output") == "output"
    assert press.press.calls == []


class _Declares(KnormPress):
    """A press that declares its contract (set per instance)."""

    def __init__(self, contract):
        super().__init__(compression_ratio=0.5)
        self.contract_declared = contract

    def press_contract(self):
        return self.contract_declared


def test_the_wrapper_always_compresses_at_prefill_and_never_runs_the_model():
    inner = PressContract(prefill=False, decoding=True, runs_model=True, batches=True)
    assert EveryChunkPress(press=_Declares(inner)).press_contract() == PressContract(batches=True)


@pytest.mark.parametrize("contract", [PressContract(decoding=True), PressContract(whole_cache=True),
                                      PressContract(chunked_prefill=True)], ids=["decoding", "whole_cache", "chunked"])
def test_a_press_that_compresses_as_tokens_arrive_is_fed_the_chunks_as_it_is(contract):
    press = _Declares(contract)
    assert press_for_chunks(press, 8) is press
