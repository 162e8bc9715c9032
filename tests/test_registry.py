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


def test_one_default_ratio_when_built_by_name():
    """kvpress's classes default to compression_ratio=0.0 (no compression); built by name (the CLI, get_press,
    sweeps) every press with a ratio gets DEFAULT_COMPRESSION_RATIO, which `kvpress-ext list` shows."""
    import warnings

    from kvpress_ext.evaluation.run_perplexity import PerplexityConfig
    from kvpress_ext.registry import DEFAULT_COMPRESSION_RATIO, press_info

    assert DEFAULT_COMPRESSION_RATIO == 0.5 == PerplexityConfig(command="").compression_ratio
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built by name with the default: no "compresses nothing" warning
        assert get_press("snapkv").compression_ratio == 0.5
        assert get_press("key_rerotation").press.compression_ratio == 0.5
        assert get_press("think").key_channel_compression_ratio == 0.5
        assert get_press("decoding").base_press.compression_ratio == 0.0  # overridden by the decoding press
    assert kvpress.SnapKVPress().compression_ratio == 0.0  # the class default we replace
    shown = {p.name: p.default for p in press_info("knorm").effective_parameters}
    assert shown["compression_ratio"] == 0.5


@pytest.mark.parametrize("name, params", [("knorm", {"compression_ratio": 0.0}),
                                          ("key_rerotation", {"compression_ratio": 0}),
                                          ("composed", {"compression_ratio": 0.0})])
def test_a_press_configured_to_compress_nothing_warns_once(name, params):
    from kvpress_ext.errors import NoCompressionWarning

    with pytest.warns(NoCompressionWarning) as caught:
        get_press(name, **params)
    relevant = [w for w in caught if issubclass(w.category, NoCompressionWarning)]
    assert len(relevant) == 1 and f"{name} is configured to compress nothing (compression_ratio=0" in str(
        relevant[0].message)


@pytest.mark.parametrize("doc, first", [
    ("Short. More text.", "Short."),
    ("Spans\n    two lines (e.g. this one). Next.", "Spans two lines (e.g. this one)."),
    ("R-KV (Cai et al. 2025, arXiv 2505.24133): keep keys. Rest.", "R-KV (Cai et al. 2025, arXiv 2505.24133): keep keys."),
    ("Uses ``window`` and :class:`ScorerPress` here.\n\nParameters", "Uses window and ScorerPress here."),
    ("Version 0.5 is used. Then", "Version 0.5 is used."),
    ("No full stop at all", "No full stop at all"),
    ("Lists follow:\n\n- a", "Lists follow."),
])
def test_first_sentence(doc, first):
    from kvpress_ext.registry import first_sentence

    assert first_sentence(doc) == first


def test_list_shows_whole_first_sentences_and_describe_lists_parameters_once(capsys):
    """`kvpress-ext list` gives each press its docstring's first sentence (wrapped, never cut), and `describe`
    does not print a parameter list the docstring already has."""
    import re

    from kvpress_ext.cli import main
    from kvpress_ext.registry import available_presses

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    joined = " ".join(out.split())  # undo the wrapping
    for name, info in available_presses().items():
        assert f"{name} {info.summary}" in joined, name
        first_paragraph = info.doc.strip().split("\n\n")[0]
        assert info.summary.endswith(".") or ". " not in first_paragraph, (name, info.summary)  # a whole sentence
    assert "Lazy-Pruning StreamingLLM: attention sinks and a recent window, compacted once every slack tokens." in joined
    assert max(len(line) for line in out.splitlines()) <= 120
    assert main(["describe", "snapkv"]) == 0
    out = capsys.readouterr().out
    for param in ("compression_ratio", "window_size", "kernel_size"):
        assert len(re.findall(rf"^\s*{param}\b", out, re.MULTILINE)) == 1, (param, out)
    assert "compression_ratio=0.5 (class default 0.0)" in out
