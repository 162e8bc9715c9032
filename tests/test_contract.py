"""The press contract: how each kind of press gets its capabilities, and the helpers that read them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import kvpress
import pytest

from kvpress_ext.core import contract as contract_module
from kvpress_ext.core.contract import (
    KVPRESS_CONTRACTS,
    PressContract,
    budget_parameters,
    contract_of,
    first_skip_warning,
    forget_skip_warning,
    from_compression_ratio,
    fuses_chunks,
    has_settable_ratio,
    inner_press,
    prefill_chunk_size,
    reset_press,
    sized_by_budget,
)
from kvpress_ext.core.registry import available_presses, get_press
from kvpress_ext.presses.a3 import A3Press
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.presses.rkv import RKVPress


def test_a_kvpress_scorer_press_gets_the_defaults_and_batches():
    assert contract_of(kvpress.KnormPress(0.5)) == PressContract(batches=True)  # top-k of per-sequence scores
    assert PressContract() == PressContract(prefill=True, decoding=False, whole_cache=False, runs_model=False,
                                            positions_follow_cache=False, budget_parameters=(),
                                            chunked_prefill=False, takes_context_chunks=False, batches=False)


def test_no_press_compresses_nothing():
    contract = contract_of(None)
    assert not contract.prefill and not contract.decoding and not contract.runs_model


@pytest.mark.parametrize(("press", "expected"), [
    (kvpress.DecodingPress(base_press=kvpress.KnormPress()), PressContract(prefill=False, decoding=True)),
    (kvpress.PrefillDecodingPress(prefilling_press=kvpress.KnormPress(0.5),
                                  decoding_press=kvpress.DecodingPress(base_press=kvpress.KnormPress())),
     PressContract(prefill=True, decoding=True)),
    (kvpress.KeyRerotationPress(press=kvpress.KnormPress(0.5)), PressContract(positions_follow_cache=True,
                                                                             batches=True)),
])
def test_kvpress_classes_with_special_needs_come_from_the_table(press, expected):
    assert contract_of(press) == expected


def test_the_table_follows_instance_parameters():
    dms = get_press("dms")
    assert contract_of(dms).decoding is bool(dms.decoding)
    dms.decoding = not dms.decoding
    assert contract_of(dms).decoding is bool(dms.decoding)


def test_a_subclass_of_a_table_class_inherits_its_entry():
    class MyRerotation(kvpress.KeyRerotationPress):
        pass

    assert contract_of(MyRerotation(press=kvpress.KnormPress(0.5))).positions_follow_cache


def test_a_press_that_overrides_call_runs_the_model_itself():
    for name in ("kvzip", "finch"):
        assert contract_of(get_press(name)).runs_model, name
    assert contract_of(get_press("finch")).positions_follow_cache  # rerotate_keys defaults to True
    assert not contract_of(get_press("knorm")).runs_model


def test_a_declared_contract_wins_and_is_trusted():
    @dataclass
    class Declared(kvpress.KeyRerotationPress):  # in the table, and overrides __call__, yet declares its own
        contract: ClassVar[PressContract] = PressContract(decoding=True)

        def __call__(self, model):
            raise AssertionError("not called")

    press = Declared(press=kvpress.KnormPress(0.5))
    assert contract_of(press) == PressContract(decoding=True)


def test_a_contract_may_depend_on_the_instance():
    @dataclass
    class Switchable(kvpress.KnormPress):
        decode_too: bool = False

        def press_contract(self) -> PressContract:
            return PressContract(decoding=self.decode_too)

    assert not contract_of(Switchable()).decoding
    assert contract_of(Switchable(decode_too=True)).decoding


def test_our_presses_declare_what_they_do():
    rkv = contract_of(RKVPress(budget=64))
    assert (rkv.prefill, rkv.decoding, rkv.whole_cache, rkv.budget_parameters) == (True, True, False, ("budget",))
    lazy = contract_of(LazyStreamingPress(cap_total=64, slack=8))
    assert (lazy.whole_cache, lazy.chunked_prefill, lazy.budget_parameters) == (True, True, ("cap_total", "window"))
    a3 = contract_of(A3Press())
    assert (a3.prefill, a3.decoding, a3.takes_context_chunks) == (False, False, True)
    assert not any(c.runs_model for c in (rkv, lazy, a3))  # their __call__ wraps apply_press


#: Presses whose constructor needs a size that has no default.
REQUIRED = {"lazy_streaming": {"cap_total": 256}, "per_layer_compression": {"compression_ratios": [0.5, 0.5]}}


def test_every_registered_press_has_a_contract():
    for name, info in available_presses().items():
        if info.requires:
            continue
        press = get_press(name, **REQUIRED.get(name, {}))
        assert isinstance(contract_of(press), PressContract), name


def test_budget_helpers_read_the_class():
    assert budget_parameters(RKVPress) == ("budget",) and sized_by_budget(LazyStreamingPress)
    assert budget_parameters(kvpress.SnapKVPress) == () and not sized_by_budget(kvpress.SnapKVPress)
    assert from_compression_ratio(RKVPress, 0.75, 1024).budget == 256
    assert from_compression_ratio(LazyStreamingPress, 0.5, 1024).cap_total == 512
    with pytest.raises(TypeError, match="compression_ratio"):
        from_compression_ratio(kvpress.SnapKVPress, 0.5, 1024)


def test_chunk_size_and_chunk_fusion_only_where_declared():
    lazy = LazyStreamingPress(cap_total=64, slack=8)
    assert prefill_chunk_size(lazy) == 8
    assert prefill_chunk_size(kvpress.KnormPress(0.5)) is None
    assert fuses_chunks(A3Press()) and callable(A3Press().fuse)
    assert not fuses_chunks(kvpress.KnormPress(0.5)) and not fuses_chunks(lazy)


def test_reset_reaches_the_press_and_its_decoding_press():
    calls = []

    class Stateful:
        def reset(self):
            calls.append("outer")

    class Inner:
        def reset(self):
            calls.append("inner")

    outer = Stateful()
    outer.decoding_press = Inner()
    reset_press(outer)
    assert calls == ["outer", "inner"]
    reset_press(kvpress.KnormPress(0.5))  # no state: nothing to do, no error


def test_inner_press_looks_through_wrappers_only():
    knorm = kvpress.KnormPress(0.5)
    assert inner_press(kvpress.KeyRerotationPress(press=knorm)) is knorm
    assert inner_press(knorm) is None
    assert inner_press(get_press("adakv")) is not None


def test_a_skip_warning_is_given_once_until_forgotten():
    press = kvpress.KnormPress(0.5)
    assert first_skip_warning(press) and not first_skip_warning(press)
    forget_skip_warning(press)
    assert first_skip_warning(press)


def test_the_table_holds_classes_not_names():
    assert all(isinstance(cls, type) and issubclass(cls, kvpress.BasePress) for cls in KVPRESS_CONTRACTS)


# --- edges: each table entry changes only its own fields, what is not a declaration, odd wrappers and presses -------
DEFAULTS = {"prefill": True, "decoding": False, "whole_cache": False, "runs_model": False,
            "positions_follow_cache": False, "budget_parameters": (), "chunked_prefill": False,
            "takes_context_chunks": False, "batches": False}


def _fields(contract):
    return {f.name: getattr(contract, f.name) for f in fields(contract)}


@pytest.mark.parametrize(("press", "differs"), [
    (lambda: kvpress.DecodingPress(base_press=kvpress.KnormPress(0.5)), {"prefill": False, "decoding": True}),
    (lambda: kvpress.PrefillDecodingPress(prefilling_press=kvpress.KnormPress(0.5)), {"decoding": True}),
    (lambda: kvpress.KeyRerotationPress(press=kvpress.KnormPress(0.5)), {"positions_follow_cache": True, "batches": True}),
    (lambda: kvpress.FinchPress(compression_ratio=0.5, rerotate_keys=True),
     {"positions_follow_cache": True, "runs_model": True}),
    (lambda: kvpress.FinchPress(compression_ratio=0.5, rerotate_keys=False), {"runs_model": True}),
    (lambda: kvpress.KVzipPress(compression_ratio=0.5), {"runs_model": True}),
])
def test_each_table_entry_changes_only_its_own_fields(press, differs):
    assert _fields(PressContract()) == DEFAULTS
    assert _fields(contract_of(press())) == {**DEFAULTS, **differs}


def test_restore_kv_press_positions_follow_the_cache():
    assert KVPRESS_CONTRACTS[kvpress.RestoreKVPress](None) == PressContract(positions_follow_cache=True)


def test_the_most_derived_table_entry_wins(monkeypatch):
    table = {kvpress.BasePress: lambda p: PressContract(batches=True), kvpress.KnormPress: lambda p: PressContract()}
    monkeypatch.setattr(contract_module, "KVPRESS_CONTRACTS", table)
    assert contract_of(kvpress.KnormPress(0.5)) == PressContract()
    assert contract_of(kvpress.SnapKVPress()) == PressContract(batches=True)


@dataclass
class _NotAContract(kvpress.DecodingPress):
    contract: ClassVar[str] = "decoding only"  # not a PressContract: ignored


@dataclass
class _ByInstance(kvpress.KnormPress):
    def press_contract(self) -> PressContract:
        return PressContract(budget_parameters=("budget",))


def test_what_is_not_a_declaration_is_ignored():
    assert contract_of(_NotAContract(base_press=kvpress.KnormPress(0.5))) == PressContract(prefill=False, decoding=True)
    assert budget_parameters(_ByInstance) == ()  # an instance-dependent contract declares nothing for the class
    undeclared = kvpress.KnormPress(0.5)
    undeclared.prefill_chunk_size = 64  # an attribute alone is not a declaration
    undeclared.fuse = lambda *a: None  # nor is a method of the name
    assert prefill_chunk_size(undeclared) is None and not fuses_chunks(undeclared)


def test_a_ratio_press_refused_by_from_compression_ratio_is_named():
    with pytest.raises(TypeError, match=r"^SnapKVPress is sized by compression_ratio, not a token budget$"):
        from_compression_ratio(kvpress.SnapKVPress, 0.5, 1024)


def test_reset_skips_an_attribute_that_is_not_callable():
    class Odd:
        reset = 3
        decoding_press = None

    reset_press(Odd())


def test_inner_press_is_none_for_a_name_or_a_class():
    for not_a_press in ("knorm", kvpress.KnormPress, None):
        assert inner_press(type("Holder", (), {"press": not_a_press})()) is None


def test_skip_warnings_are_per_press_and_a_slotted_press_warns_every_time():
    first, second = kvpress.KnormPress(0.5), kvpress.KnormPress(0.5)
    assert first_skip_warning(first) and first_skip_warning(second)
    forget_skip_warning(None)

    class Slotted:
        __slots__ = ()

    slotted = Slotted()
    assert first_skip_warning(slotted) and first_skip_warning(slotted)
    forget_skip_warning(slotted)


def test_the_restore_kv_class_is_found_and_forgetting_an_unwarned_press_is_harmless():
    assert contract_module._restore_kv() is kvpress.RestoreKVPress
    forget_skip_warning(kvpress.KnormPress(0.5))  # never warned: nothing to forget


def test_class_level_budget_ignores_a_contract_attribute_that_is_not_a_contract():
    assert budget_parameters(_NotAContract) == ()


def test_from_compression_ratio_passes_the_other_parameters_on():
    press = from_compression_ratio(RKVPress, 0.75, 100, window_size=4)
    assert (press.budget, press.window_size) == (25, 4)


def test_composed_presses_and_ratio_sizing_are_read_through_the_contract():
    from kvpress_ext.core.contract import composed_presses, takes_compression_ratio

    knorm, streaming = kvpress.KnormPress(0.5), kvpress.StreamingLLMPress(0.5)
    assert composed_presses(kvpress.ComposedPress(presses=[knorm, streaming])) == [knorm, streaming]
    assert composed_presses(knorm) == []
    assert takes_compression_ratio(kvpress.SnapKVPress) and takes_compression_ratio(kvpress.AdaKVPress)
    assert not takes_compression_ratio(kvpress.DecodingPress) and not takes_compression_ratio(RKVPress)


class _FixedRatio:
    """A press whose ratio can be read but not set."""

    @property
    def compression_ratio(self):
        return 0.5


class _TypedRatio:
    """A press whose ratio setter refuses the value (a validating property)."""

    @property
    def compression_ratio(self):
        return 0.5

    @compression_ratio.setter
    def compression_ratio(self, value):
        raise TypeError("no")


class _RatioAfterForward:
    """DMS/SimLayerKV: the ratio is computed from the last forward and raises before one."""

    @property
    def compression_ratio(self):
        raise RuntimeError("no forward yet")


def test_only_a_numeric_ratio_that_can_be_set_is_settable():
    knorm = kvpress.KnormPress(compression_ratio=0.25)
    assert has_settable_ratio(knorm) and knorm.compression_ratio == 0.25  # set to its own value: unchanged
    assert has_settable_ratio(kvpress.KnormPress(compression_ratio=0))  # an int ratio is a number too

    @dataclass
    class Flag:
        compression_ratio: bool = True

    assert not has_settable_ratio(Flag())
    assert not has_settable_ratio(object())
    assert not has_settable_ratio(_FixedRatio())
    assert not has_settable_ratio(_TypedRatio())
    assert not has_settable_ratio(_RatioAfterForward())


def test_batch_refusal_names_why_each_kind_of_press_cannot_batch():
    """The reason a padded batch is refused, by kind of press, word for word (the one line the user reads)."""
    refusal = contract_module.batch_refusal
    assert refusal(kvpress.KVzipPress(compression_ratio=0.5)) == "it runs the model itself, one sequence at a time"
    assert refusal(kvpress.RandomPress()) == contract_module._BATCH_REFUSALS[kvpress.RandomPress]
    assert refusal(kvpress.RandomPress()).endswith("(give it a seed)")

    class MyDecoding(kvpress.DecodingPress):  # a subclass gets its base class's reason
        pass

    assert refusal(MyDecoding(base_press=kvpress.KnormPress())) == \
        "it counts decoding steps for the whole batch, not per sequence"
    assert refusal(kvpress.PyramidKVPress(compression_ratio=0.5)) == \
        "its compression is not kvpress's per-sequence top-k: it may keep different counts per layer or head"

    @dataclass
    class Undeclared(kvpress.BasePress):  # hooks like any kvpress press, but not a scorer and no declaration
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            return keys, values

    assert refusal(Undeclared()) == \
        "it does not declare that it compresses each sequence as if alone (PressContract.batches)"


def test_decoding_compressor_is_the_scorer_that_runs_while_decoding():
    knorm = kvpress.KnormPress()
    decoding = kvpress.DecodingPress(base_press=knorm)
    assert contract_module.decoding_compressor(decoding) is knorm
    both = kvpress.PrefillDecodingPress(prefilling_press=kvpress.SnapKVPress(), decoding_press=decoding)
    assert contract_module.decoding_compressor(both) is knorm  # the decoding side's scorer, not the prefill press
    rkv = RKVPress()
    assert contract_module.decoding_compressor(rkv) is rkv  # compresses while decoding by itself

    class Named:
        base_press = "knorm"  # a name, not a press

    named = Named()
    assert contract_module.decoding_compressor(named) is named
