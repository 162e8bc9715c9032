"""apply_press (core/apply.py) and the press contract it reads (core/contract.py): every field of a contract as
kvpress-ext reads it, the kvpress table matched by class through the MRO, what apply_press installs for each kind
of press, and what happens when a press refuses its input."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, fields
from typing import ClassVar

import kvpress
import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core import apply as A
from kvpress_ext.core import contract as C
from kvpress_ext.core.contract import PressContract, contract_of
from kvpress_ext.core.errors import PressInputError, PressSkippedWarning, UnsupportedModelError
from kvpress_ext.core.positions import next_position
from kvpress_ext.presses.a3 import A3Press
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.testing import tiny_model

DEFAULTS = {"prefill": True, "decoding": False, "whole_cache": False, "runs_model": False,
            "positions_follow_cache": False, "budget_parameters": (), "chunked_prefill": False,
            "takes_context_chunks": False, "batches": False}


def _as_dict(contract):
    return {f.name: getattr(contract, f.name) for f in fields(contract)}


def test_defaults_describe_a_plain_scorer_press():
    assert _as_dict(PressContract()) == DEFAULTS
    assert contract_of(kvpress.KnormPress(compression_ratio=0.5)) == PressContract()
    assert contract_of(None) == PressContract(prefill=False)


def _knorm():
    return kvpress.KnormPress(compression_ratio=0.5)


@pytest.mark.parametrize(("press", "differs"), [
    (lambda: kvpress.DecodingPress(base_press=_knorm()), {"prefill": False, "decoding": True}),
    (lambda: kvpress.PrefillDecodingPress(prefilling_press=_knorm(), decoding_press=None), {"decoding": True}),
    (lambda: kvpress.KeyRerotationPress(press=_knorm()), {"positions_follow_cache": True}),
    (lambda: kvpress.FinchPress(compression_ratio=0.5, rerotate_keys=True),
     {"positions_follow_cache": True, "runs_model": True}),
    (lambda: kvpress.FinchPress(compression_ratio=0.5, rerotate_keys=False), {"runs_model": True}),
    (lambda: kvpress.KVzipPress(compression_ratio=0.5), {"runs_model": True}),
])
def test_kvpress_classes_with_special_needs_get_them_from_the_table(press, differs):
    assert _as_dict(contract_of(press())) == {**DEFAULTS, **differs}


def test_dms_press_decodes_only_when_asked():
    for decoding in (True, False):
        press = kvpress.DMSPress.__new__(kvpress.DMSPress)  # the table reads only ``decoding``
        press.decoding = decoding
        assert _as_dict(contract_of(press)) == {**DEFAULTS, "decoding": decoding}


@pytest.mark.skipif(not hasattr(kvpress, "RestoreKVPress"), reason="RestoreKVPress is in newer kvpress releases only")
def test_restore_kv_press_positions_follow_the_cache():
    assert C.KVPRESS_CONTRACTS[kvpress.RestoreKVPress](None) == PressContract(positions_follow_cache=True)


def test_the_most_derived_table_entry_wins():
    @dataclass
    class Rerotating(kvpress.KeyRerotationPress):
        pass

    assert contract_of(Rerotating(press=_knorm())).positions_follow_cache
    # a class listed under its own entry, deriving from another listed one: its own entry first
    table = {kvpress.BasePress: lambda p: PressContract(batches=True), kvpress.KnormPress: lambda p: PressContract()}
    original = dict(C.KVPRESS_CONTRACTS)
    C.KVPRESS_CONTRACTS.clear()
    C.KVPRESS_CONTRACTS.update(table)
    try:
        assert contract_of(_knorm()) == PressContract()
        assert contract_of(kvpress.SnapKVPress()) == PressContract(batches=True)
    finally:
        C.KVPRESS_CONTRACTS.clear()
        C.KVPRESS_CONTRACTS.update(original)


@dataclass
class _Declared(kvpress.KnormPress):
    contract: ClassVar[PressContract] = PressContract(prefill=False, decoding=True, batches=True)


@dataclass
class _ByInstance(kvpress.KnormPress):
    streams: bool = False

    def press_contract(self) -> PressContract:
        return PressContract(chunked_prefill=self.streams)


@dataclass
class _NotAContract(kvpress.DecodingPress):
    contract: ClassVar[str] = "decoding only"  # not a PressContract: ignored


class _RunsModel(kvpress.KnormPress):
    def __call__(self, model):
        return super().__call__(model)


class _RunsModelDeclared(_RunsModel):
    contract: ClassVar[PressContract] = PressContract(decoding=True)


def test_a_declaration_wins_over_the_table_and_may_depend_on_the_instance():
    assert contract_of(_Declared()) == PressContract(prefill=False, decoding=True, batches=True)
    assert contract_of(_ByInstance(streams=True)) == PressContract(chunked_prefill=True)
    assert contract_of(_ByInstance()) == PressContract()
    assert contract_of(_NotAContract(base_press=_knorm())) == PressContract(prefill=False, decoding=True)
    assert contract_of(RKVPress()) == PressContract(decoding=True, budget_parameters=("budget",))


def test_an_undeclared_press_with_its_own_call_runs_the_model_and_a_declared_one_says_itself():
    assert contract_of(_RunsModel()) == PressContract(runs_model=True)
    assert contract_of(_RunsModelDeclared()) == PressContract(decoding=True)
    assert A.drives_model(_RunsModel()) and not A.drives_model(_RunsModelDeclared())


def test_budget_parameters_are_read_from_the_class_declaration():
    assert C.budget_parameters(RKVPress) == ("budget",)
    assert C.budget_parameters(LazyStreamingPress) == ("cap_total", "window")
    assert C.budget_parameters(kvpress.KnormPress) == ()
    assert C.budget_parameters(_ByInstance) == ()  # an instance-dependent contract has no class-level budget
    assert C.sized_by_budget(RKVPress) and not C.sized_by_budget(kvpress.KnormPress)


def test_from_compression_ratio_builds_budget_presses_and_refuses_ratio_presses():
    press = C.from_compression_ratio(RKVPress, 0.75, 100, window_size=4)
    assert isinstance(press, RKVPress) and press.budget == 25 and press.window_size == 4
    with pytest.raises(TypeError, match=r"^KnormPress is sized by compression_ratio, not a token budget$"):
        C.from_compression_ratio(kvpress.KnormPress, 0.5, 100)


def test_chunk_size_and_pipeline_call_only_when_the_contract_says_so():
    streaming = LazyStreamingPress(window=8, slack=16)
    assert C.prefill_chunk_size(streaming) == 16
    undeclared = _knorm()
    undeclared.prefill_chunk_size = 64  # an attribute alone is not a declaration
    assert C.prefill_chunk_size(undeclared) is None
    a3 = A3Press.__new__(A3Press)
    assert C.pipeline_call(a3) == a3.pipeline_call
    undeclared.pipeline_call = lambda *a: None
    assert C.pipeline_call(undeclared) is None


class _Counting:
    def __init__(self, inner=None):
        self.resets, self.decoding_press = 0, inner

    def reset(self):
        self.resets += 1


def test_reset_reaches_the_press_and_the_decoding_press_it_wraps():
    inner = _Counting()
    outer = _Counting(inner)
    C.reset_press(outer)
    assert (outer.resets, inner.resets) == (1, 1)
    odd = _Counting()
    odd.reset = 3  # not callable: left alone
    C.reset_press(odd)
    C.reset_press(_knorm())  # no reset at all


def test_inner_press_looks_through_wrappers_only():
    knorm = _knorm()
    assert C.inner_press(kvpress.KeyRerotationPress(press=knorm)) is knorm
    assert C.inner_press(knorm) is None
    for not_a_press in ("knorm", kvpress.KnormPress, None):
        holder = type("Holder", (), {"press": not_a_press})()
        assert C.inner_press(holder) is None


def test_skip_warning_once_per_press_until_forgotten():
    press = _knorm()
    assert C.first_skip_warning(press) is True
    assert C.first_skip_warning(press) is False
    assert C.first_skip_warning(_knorm()) is True  # per press
    C.forget_skip_warning(press)
    assert C.first_skip_warning(press) is True
    C.forget_skip_warning(None)

    class Slotted:
        __slots__ = ()

    slotted = Slotted()
    assert C.first_skip_warning(slotted) is True and C.first_skip_warning(slotted) is True  # warns every time
    C.forget_skip_warning(slotted)


# --- what apply_press reads ----------------------------------------------------------------------------------------
def test_phase_and_mode_helpers_follow_the_contract():
    assert A.compression_phases(None) == (False, False)
    assert A.compression_phases(_knorm()) == (True, False)
    assert A.compression_phases(kvpress.DecodingPress(base_press=_knorm())) == (False, True)
    assert A.compression_phases(RKVPress()) == (True, True)
    for helper in (A.drives_model, A.positions_follow_cache, A.manages_whole_cache):
        assert helper(None) is False and helper(_knorm()) is False
    assert A.drives_model(kvpress.KVzipPress(compression_ratio=0.5))
    assert A.positions_follow_cache(kvpress.KeyRerotationPress(press=_knorm()))
    assert A.manages_whole_cache(LazyStreamingPress(window=8))


def test_which_assertions_are_about_the_attention_kernel():
    assert A.about_attention_implementation(AssertionError("needs EAGER weights"))
    assert A.about_attention_implementation(AssertionError("Attention weights are required"))
    assert not A.about_attention_implementation(AssertionError("window_size exceeds the input"))


@dataclass
class _Refusing(kvpress.KeyRerotationPress):
    """An unregistered wrapper around a registered press, refusing every input."""

    message: str = "too short"

    def forward_hook(self, module, input, kwargs, output):
        raise AssertionError(self.message)


def test_a_refused_input_warns_once_and_leaves_the_forward_uncompressed():
    model = tiny_model("llama")
    ids = torch.randint(4, 120, (1, 9), generator=torch.Generator().manual_seed(0))
    press = _Refusing(press=_knorm())
    cache = DynamicCache()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught, A.apply_press(press, model), torch.no_grad():
        warnings.simplefilter("always")
        out = model(input_ids=ids, past_key_values=cache)
    skipped = [str(w.message) for w in caught if issubclass(w.category, PressSkippedWarning)]
    # named after the registered press inside the unregistered wrapper
    assert skipped == [("knorm did not compress a 9-token input (too short); the cache keeps every token of it. "
                        "Give it a longer input or change its parameters (`kvpress-ext describe knorm`).")]
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    press.message = ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second refusal by the same press says nothing
        with A.apply_press(press, model), torch.no_grad():
            model(input_ids=ids, past_key_values=DynamicCache())
    C.forget_skip_warning(press)
    with pytest.warns(PressSkippedWarning, match=r"a 9-token input \(assertion failed\)"), A.apply_press(press, model):
        model(input_ids=ids, past_key_values=DynamicCache())


def test_an_assertion_about_attention_names_the_press_and_the_fix():
    model = tiny_model("llama")
    press = _Refusing(press=_knorm(), message="needs eager attention")
    with pytest.raises(PressInputError, match=r"^knorm cannot compress this input: needs eager attention\. "
                                              r"Change its parameters \(see `kvpress-ext describe knorm`\) or "
                                              r"the attention implementation\.$"), A.apply_press(press, model):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=DynamicCache())


def test_a_press_that_runs_the_model_needs_a_llama_family_model():
    model = tiny_model("gpt_neox")
    with pytest.raises(UnsupportedModelError, match=r"^_RunsModel runs the model itself .* not gpt_neox\. Pick a "
                                                    r"hook-based press"), A.apply_press(_RunsModel(compression_ratio=0.5), model):
        pass


def test_whole_cache_presses_see_the_cache_the_model_made_and_are_reset():
    seen = []

    @dataclass
    class Recorder(LazyStreamingPress):
        def after_forward(self, cache):
            seen.append(cache.get_seq_length())

        def reset(self):
            seen.append("reset")

    model = tiny_model("llama")
    with A.apply_press(Recorder(window=8), model), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=True)  # no cache passed: the model makes one
        model(input_ids=torch.tensor([[5, 6]]), past_key_values=DynamicCache())
    assert seen == [4, 2, "reset"]


def test_positions_follow_the_cache_for_rerotating_presses():
    model = tiny_model("llama")
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    with A.apply_press(kvpress.KeyRerotationPress(press=_knorm()), model), torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    assert cache.get_seq_length() == 10 and next_position(cache) == 10


def test_kvpress_logs_once_per_message_while_quiet():
    logger = logging.getLogger("kvpress.contract_test")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        A.quiet_repeated_kvpress_logs()
        for _ in range(3):
            logger.warning("same line")
        logger.warning("another line")
        assert [r.getMessage() for r in records] == ["same line", "another line"]
        A.quiet_repeated_kvpress_logs(enable=False)
        logger.warning("same line")
        assert len(records) == 3
        other = logging.getLogger("kvpressed")  # not a kvpress logger
        A.quiet_repeated_kvpress_logs()
        assert A._ONCE not in other.filters and A._ONCE in logger.filters
    finally:
        A.quiet_repeated_kvpress_logs(enable=False)
        logger.removeHandler(handler)
