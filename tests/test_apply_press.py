"""apply_press (core/apply.py): what it reads from the press contract (tests/test_contract.py has the contract
itself), what it installs for each kind of press, what happens when a press refuses its input, and kvpress's log
lines shown once per message."""

from __future__ import annotations

import logging
import uuid
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import kvpress
import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core import apply as A
from kvpress_ext.core import contract as C
from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.errors import PressInputError, PressSkippedWarning, UnsupportedModelError
from kvpress_ext.core.positions import next_position
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.testing import tiny_model


def _knorm():
    return kvpress.KnormPress(compression_ratio=0.5)


class _RunsModel(kvpress.KnormPress):
    def __call__(self, model):
        return super().__call__(model)


class _RunsModelDeclared(_RunsModel):
    contract: ClassVar[PressContract] = PressContract(decoding=True)


def test_phase_and_mode_helpers_follow_the_contract():
    assert C.compression_phases(None) == (False, False)
    assert C.compression_phases(_knorm()) == (True, False)
    assert C.compression_phases(kvpress.DecodingPress(base_press=_knorm())) == (False, True)
    assert C.compression_phases(RKVPress()) == (True, True)
    for helper in (C.drives_model, C.positions_follow_cache, A.manages_whole_cache):
        assert helper(None) is False and helper(_knorm()) is False
    assert C.drives_model(kvpress.KVzipPress(compression_ratio=0.5))
    assert C.drives_model(_RunsModel()) and not C.drives_model(_RunsModelDeclared())  # a declaration is trusted
    assert C.positions_follow_cache(kvpress.KeyRerotationPress(press=_knorm()))
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
    """Asked through the logger's own filters (what decides whether a record is handled), so the check does not
    depend on levels or handlers set elsewhere in the process."""
    logger = logging.getLogger("kvpress.apply_press_test")
    other = logging.getLogger("kvpressed")  # not a kvpress logger

    run = uuid.uuid4().hex  # the filter remembers messages for the whole process: new ones for each run of this test

    def shown(name, message="same line", level=logging.WARNING):
        log = logging.getLogger(name)
        return bool(log.filter(log.makeRecord(name, level, __file__, 1, f"{message} {run}", (), None)))

    try:
        A.quiet_repeated_kvpress_logs()
        assert [shown(logger.name) for _ in range(3)] == [True, False, False]
        assert shown(logger.name, "another line") and shown(logger.name, level=logging.INFO)  # message and level
        assert shown(other.name) and shown(other.name) and A._ONCE not in other.filters
        A.quiet_repeated_kvpress_logs(enable=False)
        assert A._ONCE not in logger.filters and shown(logger.name)
    finally:
        A.quiet_repeated_kvpress_logs(enable=False)


def test_after_forward_gets_the_callers_cache_else_the_one_the_model_made():
    got = []
    hook = A._after_forward_hook(SimpleNamespace(after_forward=got.append))
    mine, made = object(), object()
    out = SimpleNamespace(past_key_values=made)
    assert hook(None, (), {"past_key_values": mine}, out) is out
    hook(None, (), {}, out)
    hook(None, (), {}, object())  # no cache anywhere: nothing to compress
    assert got == [mine, made]


def test_a_refusal_without_hidden_states_and_where_its_warning_points():
    with pytest.warns(PressSkippedWarning, match=r"did not compress a \?-token input \(x\)") as caught:
        A._input_refused(_knorm(), AssertionError("x"), None)
    # the caller of the refusal; under mutation testing mutmut's wrapper stands between the two
    assert caught[0].filename == __file__ or caught[0].filename.endswith("trampoline.py"), caught[0].filename


@dataclass
class _Recording(kvpress.KnormPress):
    inputs: list = field(default_factory=list)

    def forward_hook(self, module, input, kwargs, output):
        self.inputs.append(input)
        return output


def test_the_press_hook_gets_the_positional_inputs_as_a_list():
    model = tiny_model("llama")
    press = _Recording(compression_ratio=0.5)
    with A.apply_press(press, model), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=DynamicCache())
    assert len(press.inputs) == model.config.num_hidden_layers and all(isinstance(i, list) for i in press.inputs)


def test_a_registered_wrapper_is_named_itself_not_its_inner_press():
    assert A._user_facing_name(kvpress.KeyRerotationPress(press=_knorm())) == "key_rerotation"


def test_quiet_logs_cover_the_kvpress_logger_once_and_loggers_created_later():
    top = logging.getLogger("kvpress")
    try:
        A.quiet_repeated_kvpress_logs()
        A.quiet_repeated_kvpress_logs()
        assert top.filters.count(A._ONCE) == 1
        later = logging.getLogger(f"kvpress.created_later_{uuid.uuid4().hex}")
        with A.apply_press(None, tiny_model("llama")):
            pass
        assert A._ONCE in later.filters
    finally:
        A.quiet_repeated_kvpress_logs(enable=False)
    assert A._ONCE not in top.filters
    never_quiet = logging.getLogger(f"kvpress.never_quiet_{uuid.uuid4().hex}")
    A.quiet_repeated_kvpress_logs(enable=False)  # turning it off adds nothing anywhere
    assert A._ONCE not in never_quiet.filters


def test_a_new_once_per_message_filter_starts_empty():
    f = A._OncePerMessage()
    record = logging.LogRecord("kvpress", logging.WARNING, __file__, 1, "line", (), None)
    assert f.filter(record) and not f.filter(record)
