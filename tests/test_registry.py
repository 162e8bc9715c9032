"""The press registry: names, parameters, documented errors."""

from dataclasses import dataclass

import kvpress
import pytest

import kvpress_ext
from kvpress_ext import PressParameterError, UnknownPressError, get_press, register_press
from kvpress_ext.kvpress_presses import kvpress_press_classes


def test_every_kvpress_press_is_registered_by_snake_case_name():
    presses = kvpress_ext.available_presses()
    for name in ("knorm", "snapkv", "expected_attention", "streaming_llm", "tova", "no_press"):
        assert name in presses
    exported = {c for c in vars(kvpress).values() if isinstance(c, type) and issubclass(c, kvpress.BasePress)}
    exported -= {kvpress.BasePress, kvpress.ScorerPress}
    registered = {info.cls for info in presses.values()}
    assert exported <= registered, exported - registered
    assert set(kvpress_press_classes()) <= set(presses)
    for name, info in presses.items():
        assert name == name.lower() and " " not in name
        assert info.summary, f"{name} has no one-line doc"


def test_get_press_builds_with_parameters_and_no_press_is_none():
    press = get_press("knorm", compression_ratio=0.3)
    assert isinstance(press, kvpress.KnormPress) and press.compression_ratio == 0.3
    assert get_press("no_press") is None


def test_unknown_name_lists_closest_names():
    with pytest.raises(UnknownPressError, match="snapkv"):
        get_press("snapvk")
    with pytest.raises(ValueError, match="kvpress-ext list"):
        get_press("totally_unknown_press")


def test_unknown_parameter_names_the_press_parameters():
    with pytest.raises(PressParameterError, match=r"no parameter 'windw_size'.*window_size"):
        get_press("snapkv", windw_size=3)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5"])
def test_ratio_out_of_range(ratio):
    with pytest.raises(PressParameterError, match=r"\[0, 1\)"):
        get_press("knorm", compression_ratio=ratio)


def test_non_positive_budget_names_valid_range():
    @register_press("test_budget_press")
    @dataclass
    class BudgetPress(kvpress.BasePress):
        """A test press with a budget."""

        budget: int = 8

    with pytest.raises(PressParameterError, match="positive integer"):
        get_press("test_budget_press", budget=0)
    assert get_press("test_budget_press", budget=3).budget == 3


def test_wrappers_take_inner_press_by_name_and_pass_parameters_inwards():
    press = get_press("key_rerotation", press="snapkv", compression_ratio=0.25, window_size=4)
    assert isinstance(press, kvpress.KeyRerotationPress)
    assert isinstance(press.press, kvpress.SnapKVPress)
    assert press.press.compression_ratio == 0.25 and press.press.window_size == 4
    composed = get_press("composed")
    assert [type(p) for p in composed.presses] == [kvpress.KnormPress, kvpress.StreamingLLMPress]


def test_parameters_are_read_from_the_dataclass():
    info = kvpress_ext.press_info("snapkv")
    names = {p.name: p.default for p in info.parameters}
    assert names == {"compression_ratio": 0.0, "window_size": 64, "kernel_size": 5}
