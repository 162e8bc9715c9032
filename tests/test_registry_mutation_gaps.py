"""Press registry behaviours that mutation testing found unchecked (issue #16): every abbreviation of the
one-line summaries, names that are not strings, who a warning is reported against, the collision rule for the
decorator, built-in classes registering while a plugin loads, and warnings of inner presses."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import kvpress
import pytest

import kvpress_ext
from kvpress_ext import PressParameterError, UnknownPressError, get_press, register_press
from kvpress_ext.core import tables as registration
from kvpress_ext.core.errors import NoCompressionWarning
from kvpress_ext.core.registry import compresses_nothing, first_sentence
from kvpress_ext.core.tables import RegistrationConflict


@pytest.fixture
def sandbox():
    """The loaded press table, restored afterwards."""
    from kvpress_ext.core import registry

    kvpress_ext.available_presses()
    saved = registry._PRESSES.snapshot()
    yield registry
    registry._PRESSES.restore(saved)


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
def test_first_sentence_edges(doc, first):
    assert first_sentence(doc) == first


@pytest.mark.parametrize("name", [3, None, ["knorm"]])
def test_names_that_are_not_strings(sandbox, name):
    with pytest.raises(PressParameterError, match="is not snake_case"):
        sandbox.add_press(name, type("P", (), {}))
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


def test_decorator_refuses_a_taken_name_unless_override(sandbox):
    with pytest.raises(RegistrationConflict, match="already registered by built-in"):
        @register_press("knorm")
        class Impostor:
            """Not knorm."""

    @register_press("knorm", override=True)
    class Replacement:
        """Knorm, replaced on purpose."""

    info = kvpress_ext.press_info("knorm")
    assert info.cls is Replacement and info.override_note == "overrides built-in"


def test_a_kvpress_ext_class_registering_while_a_plugin_loads_is_built_in(sandbox):
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


def test_inner_press_warnings_other_than_no_compression_reach_the_caller(sandbox):
    sandbox.add_press("noisy_inner", _Noisy)
    sandbox.add_press("wrapping_press", _Wrapper)
    with pytest.warns(UserWarning, match="noisy inner press"):
        press = get_press("wrapping_press", press="noisy_inner")
    assert isinstance(press.press, _Noisy)
