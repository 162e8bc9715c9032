"""The press registry: names, parameters, documented errors, one-line summaries, warnings."""

import warnings
from dataclasses import dataclass

import kvpress
import pytest

import kvpress_ext
from kvpress_ext import PressParameterError, UnknownPressError, get_press, register_press
from kvpress_ext.core import tables as registration
from kvpress_ext.core.errors import NoCompressionWarning
from kvpress_ext.core.kvpress_table import kvpress_press_classes, register_kvpress_presses, snake_name
from kvpress_ext.core.registry import compresses_nothing, first_sentence
from kvpress_ext.core.tables import RegistrationConflict
from kvpress_ext.core.temporal_order import TemporalOrderPress


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
    composed = get_press("composed")  # each press compresses the previous one's output: kept in token order
    assert [type(p.press) for p in composed.presses] == [kvpress.KnormPress, kvpress.StreamingLLMPress]
    assert all(isinstance(p, TemporalOrderPress) for p in composed.presses)
    decoding = get_press("decoding", base_press="streaming_llm", target_size=64)
    assert isinstance(decoding.base_press, TemporalOrderPress) and decoding.target_size == 64


def test_parameters_are_read_from_the_dataclass():
    info = kvpress_ext.press_info("snapkv")
    names = {p.name: p.default for p in info.parameters}
    assert names == {"compression_ratio": 0.0, "window_size": 64, "kernel_size": 5}


def test_one_default_ratio_when_built_by_name():
    """kvpress's classes default to compression_ratio=0.0 (no compression); built by name (the CLI, get_press,
    sweeps) every press with a ratio gets DEFAULT_COMPRESSION_RATIO, which `kvpress-ext list` shows."""
    import warnings

    from kvpress_ext.core.registry import DEFAULT_COMPRESSION_RATIO, press_info
    from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig

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
    assert first_sentence(doc) == first


def test_list_shows_whole_first_sentences_and_describe_lists_parameters_once(capsys):
    """`kvpress-ext list` gives each press its docstring's first sentence (wrapped, never cut), and `describe`
    does not print a parameter list the docstring already has."""
    import re

    from kvpress_ext.cli import main
    from kvpress_ext.core.registry import available_presses

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


def test_describe_says_how_a_compression_ratio_sizes_a_budget_press(capsys):
    """`describe lazy_streaming` gives the ratio -> cap_total rule, and its worked example is what the code builds."""
    import re

    from kvpress_ext.cli import main
    from kvpress_ext.presses.lazy_streaming import LazyStreamingPress

    assert main(["describe", "lazy_streaming"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Built from a compression ratio" in out and "cap_total = round((1 - compression_ratio) *" in out, out
    ratio, length, cap, slack, window = re.search(
        r"ratio ([\d.]+) over ([\d,]+)-token windows: cap_total (\d+), slack (\d+), window (\d+)", out).groups()
    press = LazyStreamingPress.from_compression_ratio(float(ratio), int(length.replace(",", "")))
    assert (press.cap_total, press.slack, press.recent) == (int(cap), int(slack), int(window))
    assert main(["describe", "snapkv"]) == 0
    assert "Built from a compression ratio" not in capsys.readouterr().out  # a ratio press needs no rule


@pytest.mark.slow
def test_list_into_a_closed_pipe_stops_quietly():
    """`kvpress-ext list | head`: the reader leaves early; no traceback, the exit status a pipe-killed tool has."""
    import os
    import signal
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # every write fails at once, as after `head` has exited
    try:
        run = subprocess.run([sys.executable, "-c", "import sys; from kvpress_ext.cli import main; sys.exit(main(['list']))"],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    finally:
        os.close(write)
    assert run.stderr == "" and run.returncode == 128 + signal.SIGPIPE, (run.returncode, run.stderr[-2000:])


# --- exact behaviour of registration, lookup and validation (the messages are the user interface) -------------
@pytest.fixture
def registry_sandbox():
    """The loaded press table, restored afterwards, so test registrations do not leak into other tests."""
    from kvpress_ext.core import registry

    kvpress_ext.available_presses()  # plugins loaded before the snapshot: nothing reloads into it
    saved = registry._PRESSES.snapshot()
    yield registry
    registry._PRESSES.restore(saved)


def test_registration_records_name_source_defaults_and_requirement(registry_sandbox):
    class Plain:
        """A press."""

    registry_sandbox.add_press("plain_press", Plain)
    info = kvpress_ext.press_info("plain_press")
    assert (info.name, info.cls, info.source, info.defaults, info.requires) == (
        "plain_press", Plain, "test_registry", {}, None)  # user code: its own package is the origin

    @register_press("decorated_press")
    class Decorated:
        """Another press."""

    @register_press("third_party_press", source="someone", defaults={"a": 1}, requires="a GPU")
    class ThirdParty:
        """A third-party press."""

    info = kvpress_ext.press_info("decorated_press")
    assert (info.name, info.cls, info.source, info.defaults, info.requires) == (
        "decorated_press", Decorated, "test_registry", {}, None)
    info = kvpress_ext.press_info("third_party_press")
    assert (info.source, info.defaults, info.requires) == ("someone", {"a": 1}, "a GPU")


@pytest.mark.parametrize("name", ["", "_", "__", "bad-name", "Knorm", "two words"])
def test_registration_rejects_names_that_are_not_snake_case(registry_sandbox, name):
    with pytest.raises(PressParameterError) as err:
        registry_sandbox.add_press(name, type("P", (), {}))
    assert str(err.value) == f"Press name {name!r} is not snake_case: use lowercase letters, digits and '_'."


def test_registration_rejects_non_classes(registry_sandbox):
    with pytest.raises(PressParameterError) as err:
        registry_sandbox.add_press("not_a_class", 3)
    assert str(err.value) == "register_press('not_a_class') needs a class, got 3."


def test_press_name_of_instances_and_classes():
    assert kvpress_ext.press_name(kvpress.KnormPress()) == "knorm"
    assert kvpress_ext.press_name(kvpress.KnormPress) == "knorm"

    class Unregistered:
        pass

    assert kvpress_ext.press_name(Unregistered()) == "Unregistered"


def test_unknown_name_message(registry_sandbox):
    registry_sandbox._PRESSES.restore({})
    for name in ("press_a", "press_b", "press_c", "press_d", "press_e", "press_f", "press_g", "abxy"):
        registry_sandbox.add_press(name, type("P", (), {"__doc__": "x"}))
    with pytest.raises(UnknownPressError) as err:
        get_press("press_z")
    hint = str(err.value).split("Did you mean: ")[1].split("?")[0].split(", ")
    assert len(hint) == 5 and set(hint) <= {f"press_{c}" for c in "abcdefg"}  # the 5 closest, not 3 or 6
    assert str(err.value).endswith("? Run `kvpress-ext list` to see all 8 registered presses.")
    with pytest.raises(UnknownPressError) as err:  # similarity 0.5 ("ab" of 4 + 4 characters) is close enough
        get_press("abcd")
    assert str(err.value) == "Unknown press 'abcd'. Did you mean: abxy? Run `kvpress-ext list` to see all 8 registered presses."
    with pytest.raises(UnknownPressError) as err:
        get_press("zzzz")
    assert str(err.value) == "Unknown press 'zzzz'. Run `kvpress-ext list` to see all 8 registered presses."


def test_no_press_accepts_only_empty_parameters():
    assert get_press("no_press", compression_ratio=0) is None
    assert get_press("no_press", compression_ratio=0.0, budget=None) is None
    for value in (1, 1.0, 0.5):
        with pytest.raises(PressParameterError) as err:
            get_press("no_press", compression_ratio=value, window=None)
        assert str(err.value) == ("Press 'no_press' takes no parameters (got compression_ratio, window); "
                                  "leave them out or choose a press that compresses.")


def test_parameter_messages_name_the_press_and_its_parameters():
    from kvpress_ext.core.registry import validate_parameters

    with pytest.raises(PressParameterError) as err:
        get_press("snapkv", windw=3, kernl=2)
    assert str(err.value) == ("Press 'snapkv' has no parameter 'kernl', 'windw'. "
                              "Its parameters are: compression_ratio, kernel_size, window_size.")
    with pytest.raises(PressParameterError) as err:  # called without a registry name: the class name
        validate_parameters(kvpress.SnapKVPress, {"windw": 3})
    assert str(err.value).startswith("Press 'SnapKVPress' has no parameter 'windw'.")
    with pytest.raises(PressParameterError) as err:
        get_press("knorm", compression_ratio=1.0)
    assert str(err.value) == ("knorm: compression_ratio=1.0 is out of range; it must be a number in [0, 1) "
                              "(the fraction of the cache to remove).")
    assert get_press("knorm", compression_ratio=0).compression_ratio == 0  # 0 is in range


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "3"])
def test_positive_integer_parameters(bad):
    with pytest.raises(PressParameterError) as err:
        get_press("snapkv", window_size=bad)
    assert str(err.value) == f"snapkv: window_size={bad!r} is invalid; it must be a positive integer."
    assert get_press("snapkv", window_size=1).window_size == 1


def test_presses_without_dataclass_fields_and_hand_written_constructors(registry_sandbox):
    @register_press("fieldless_press")
    @dataclass
    class Fieldless:
        """No parameters."""

    class HandWritten:
        """A press with its own constructor."""

        def __init__(self, a, *args, b: int = 2, c: "str" = "x", d: int | None = None, e=1, _hidden=0, **kwargs):
            self.a = a

    registry_sandbox.add_press("hand_written_press", HandWritten)
    with pytest.raises(PressParameterError) as err:
        get_press("fieldless_press", x=1)
    assert str(err.value) == "Press 'fieldless_press' has no parameter 'x'. Its parameters are: (none)."
    with pytest.raises(PressParameterError) as err:
        get_press("hand_written_press", a=1, z=2)
    assert str(err.value).startswith("Press 'hand_written_press' has no parameter 'z'.")
    params = kvpress_ext.press_info("hand_written_press").parameters
    assert [(p.name, p.type, p.default, p.required) for p in params] == [
        ("a", "", None, True), ("b", "int", 2, False), ("c", "str", "x", False), ("d", "int | None", None, False),
        ("e", "", 1, False)]
    assert [str(p) for p in params] == ["a", "b=2", "c='x'", "d=None", "e=1"]


def test_constructor_errors_become_parameter_errors(registry_sandbox):
    @register_press("asserting_press")
    @dataclass
    class Asserting:
        """Checks with an assert, as kvpress does."""

        level: int = 1

        def __post_init__(self):
            if self.level >= 5:
                raise AssertionError("level too high")  # a plain assert would be rewritten by pytest
            if self.level < 0:
                raise ValueError("level negative")

    with pytest.raises(PressParameterError) as err:
        get_press("asserting_press", level=7)
    assert str(err.value) == "asserting_press: invalid parameters {'level': 7}: level too high"
    with pytest.raises(PressParameterError) as err:
        get_press("asserting_press", level=-1)
    assert str(err.value) == "asserting_press: invalid parameters {'level': -1}: level negative"


def test_wrapper_parameters_given_by_name_or_as_presses():
    knorm = kvpress.KnormPress(compression_ratio=0.2)
    composed = get_press("composed", presses=["snapkv", knorm])
    # inside a composition a scorer runs in TemporalOrderPress; a press given as an object stays the inner one
    assert isinstance(composed.presses[0].press, kvpress.SnapKVPress) and composed.presses[1].press is knorm
    decoding = get_press("decoding", base_press="snapkv")
    assert isinstance(decoding.base_press.press, kvpress.SnapKVPress)


# --- summaries at abbreviations, names that are not strings, who a warning points at, the decorator --------
@pytest.mark.parametrize("abbreviation", ["e.g.", "i.e.", "et al.", "vs.", "etc.", "Fig.", "cf.", "approx."])
def test_no_sentence_ends_at_an_abbreviation(abbreviation):
    assert first_sentence(f"Keys {abbreviation} values here. Next one.") == f"Keys {abbreviation} values here."
    # at the very end of the paragraph an abbreviation ends it
    assert first_sentence(f"Keys and values {abbreviation}") == f"Keys and values {abbreviation}"


@pytest.mark.parametrize(("doc", "first"), [
    ("", ""),
    ("   \n  ", ""),
    ("Scores the keys by X:\n\n- a list", "Scores the keys by X."),  # only the colon goes
    ("Ends with e.g. fig. X: then more", "Ends with e.g. fig."),  # "fig." (lower case) is not an abbreviation
])
def test_first_sentence_of_empty_docs_and_colons(doc, first):
    assert first_sentence(doc) == first


@pytest.mark.parametrize("name", [3, None, ["knorm"]])
def test_press_names_that_are_not_strings_are_refused(registry_sandbox, name):
    with pytest.raises(PressParameterError, match="is not snake_case"):
        registry_sandbox.add_press(name, type("P", (), {}))
    with pytest.raises(UnknownPressError, match="Unknown press"):
        kvpress_ext.press_info(name)


def test_no_compression_warning_points_at_the_caller():
    with pytest.warns(NoCompressionWarning) as caught:
        get_press("knorm", compression_ratio=0.0)
    (where,) = [w.filename for w in caught if issubclass(w.category, NoCompressionWarning)]
    # the caller's line, not the registry's; under mutation testing mutmut's wrapper stands between the two
    assert where == __file__ or where.endswith("trampoline.py"), where


def test_composition_reports_its_first_idle_press():
    press = kvpress.ComposedPress(presses=[kvpress.KnormPress(compression_ratio=0.0),
                                           kvpress.ThinKPress(key_channel_compression_ratio=0.0)])
    assert compresses_nothing(press) == "compression_ratio=0.0"
    one = kvpress.ComposedPress(presses=[kvpress.KnormPress(compression_ratio=0.0)])
    assert compresses_nothing(one) == "compression_ratio=0.0"


def test_decorator_refuses_a_taken_name_unless_override(registry_sandbox):
    with pytest.raises(RegistrationConflict, match="already registered by built-in"):
        @register_press("knorm")
        class Impostor:
            """Not knorm."""

    @register_press("knorm", override=True)
    class Replacement:
        """Knorm, replaced on purpose."""

    info = kvpress_ext.press_info("knorm")
    assert info.cls is Replacement and info.override_note == "overrides built-in"


def test_a_kvpress_ext_class_registering_while_a_plugin_loads_is_built_in(registry_sandbox):
    builtin_cls = type("Late", (), {"__module__": "kvpress_ext.presses.late", "__doc__": "A late built-in."})
    user_cls = type("Theirs", (), {"__module__": "theirpkg.presses", "__doc__": "The plugin's."})
    with registration.registering_as("someplugin"):
        register_press("late_builtin")(builtin_cls)
        register_press("their_press")(user_cls)
    assert kvpress_ext.press_info("late_builtin").source == registration.BUILTIN
    assert kvpress_ext.press_info("their_press").source == "someplugin"


@dataclass
class _Noisy:
    """A press whose construction warns."""

    compression_ratio: float = 0.5

    def __post_init__(self):
        warnings.warn("noisy inner press", UserWarning, stacklevel=2)


@dataclass
class _Wrapper:
    """Wraps one press."""

    press: object = None


def test_inner_press_warnings_other_than_no_compression_reach_the_caller(registry_sandbox):
    registry_sandbox.add_press("noisy_inner", _Noisy)
    registry_sandbox.add_press("wrapping_press", _Wrapper)
    with pytest.warns(UserWarning, match="noisy inner press"):
        press = get_press("wrapping_press", press="noisy_inner")
    assert isinstance(press.press, _Noisy)


@pytest.mark.parametrize("class_name, name", [
    ("ExpectedAttentionPress", "expected_attention"), ("HTTPServerPress", "http_server"),
    ("KVCacheLikePress", "kv_cache_like"), ("Layer2Norm", "layer2_norm"), ("TOVAPress", "tova"), ("Plain", "plain"),
])
def test_kvpress_class_names_become_snake_case_registry_names(class_name, name):
    assert snake_name(class_name) == name


def test_the_kvpress_table_lists_every_exported_concrete_press_class():
    classes = kvpress_press_classes()
    assert classes["knorm"] is kvpress.KnormPress and classes["snapkv"] is kvpress.SnapKVPress
    assert all(isinstance(cls, type) and issubclass(cls, kvpress.BasePress) for cls in classes.values())
    assert "base" not in classes and "scorer" not in classes
    exported = {snake_name(a) for a in kvpress.__all__
                if isinstance(getattr(kvpress, a), type) and issubclass(getattr(kvpress, a), kvpress.BasePress)}
    assert set(classes) == exported - {"base", "scorer"}


def test_a_press_class_kvpress_does_not_export_is_left_out(monkeypatch):
    monkeypatch.setattr(kvpress, "HiddenPress", type("HiddenPress", (kvpress.KnormPress,), {}), raising=False)
    assert "hidden" not in kvpress_press_classes()


def test_without_an_export_list_every_press_class_of_the_module_is_listed(monkeypatch):
    names = kvpress_press_classes()
    monkeypatch.delattr(kvpress, "__all__")
    assert kvpress_press_classes().items() >= names.items()


def test_each_kvpress_press_is_registered_with_its_defaults_and_requirements():
    calls = {}
    register_kvpress_presses(lambda name, cls, defaults, requires: calls.__setitem__(name, (cls, defaults, requires)))
    assert calls["knorm"] == (kvpress.KnormPress, None, None)
    assert calls["adakv"] == (kvpress.AdaKVPress, {"press": "knorm"}, None)
    assert calls["kvzip"][0] is kvpress.KVzipPress and calls["kvzip"][1] is None
    assert calls["kvzip"][2].startswith("a hub checkpoint name")
    assert set(calls) == set(kvpress_press_classes())


def test_an_exported_name_kvpress_lacks_is_passed_over(monkeypatch):
    monkeypatch.setattr(kvpress, "__all__", [*kvpress.__all__, "GonePress"])
    assert "gone" not in kvpress_press_classes() and "knorm" in kvpress_press_classes()
