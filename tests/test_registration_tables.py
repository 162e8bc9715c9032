"""The registration rule of :mod:`kvpress_ext.core.tables` on a table of its own.

Each test states the rule from the module's docstring and checks a table against it: a free key is
registered; the same origin replaces its own entry and keeps what that entry overrode; another origin is
refused with a message naming both origins, unless ``override=True``, which records whom it replaced; removing
an origin brings back what it overrode; and who counts as the origin of a registration.
"""

from __future__ import annotations

import pytest

from kvpress_ext.core import tables as registration
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.tables import BUILTIN, Registration, RegistrationConflict, Table


@pytest.fixture
def table():
    """A table of its own, taken out of the module's list of tables afterwards."""
    t = Table("widget", describe=lambda value: f"<{value}>")
    yield t
    registration._TABLES.remove(t)


def _state(t: Table):
    return {e.key: (e.value, e.origin, e.overrides) for e in t.entries()}


def test_free_key_same_origin_and_other_origin(table):
    first = table.add("a", 1, origin=BUILTIN)
    assert (first.key, first.value, first.origin, first.overrides, first.replaced) == ("a", 1, BUILTIN, None, None)
    assert first.override_note == ""
    assert table.add("a", 2, origin=BUILTIN).value == 2  # the same origin replaces its own entry
    assert _state(table) == {"a": (2, BUILTIN, None)} and len(table) == 1
    with pytest.raises(RegistrationConflict) as err:
        table.add("a", 3, origin="plug")
    assert isinstance(err.value, KVPressExtError)
    assert (err.value.kind, err.value.key, err.value.origin, err.value.holder) == ("widget", "a", "plug", BUILTIN)
    assert str(err.value) == ("widget 'a' from plugin 'plug' (<3>) is already registered by built-in (<2>); refused. "
                              "Register it with override=True to replace it on purpose, or choose another widget name.")
    assert _state(table) == {"a": (2, BUILTIN, None)}  # refused: nothing changed


def test_conflict_message_without_descriptions():
    t = Table("thing")  # no describe: nothing in parentheses
    try:
        t.add("k", object(), origin="one")
        with pytest.raises(RegistrationConflict) as err:
            t.add("k", object(), origin=BUILTIN)
        assert str(err.value).startswith("thing 'k' from built-in is already registered by plugin 'one'; refused.")
        message = str(RegistrationConflict("press", "p", "x", "y"))
        assert "from plugin 'x' is already registered by plugin 'y';" in message and "(" not in message
    finally:
        registration._TABLES.remove(t)


def test_override_records_whom_it_replaced_and_removal_brings_it_back(table):
    table.add("a", 1, origin=BUILTIN)
    table.add("b", 10, origin=BUILTIN)
    entry = table.add("a", 2, origin="plug", override=True)
    assert (entry.value, entry.origin, entry.overrides) == (2, "plug", BUILTIN)
    assert entry.replaced.value == 1 and entry.override_note == "overrides built-in"
    again = table.add("a", 3, origin="plug")  # the same origin again: keeps what it overrode
    assert (again.value, again.overrides, again.replaced.value) == (3, BUILTIN, 1)
    third = table.add("a", 4, origin="other", override=True)
    assert third.override_note == "overrides plugin 'plug'"
    table.add("c", 5, origin="plug")
    table.remove_origin("other")
    assert _state(table) == {"a": (3, "plug", BUILTIN), "b": (10, BUILTIN, None), "c": (5, "plug", None)}
    table.remove_origin("plug")
    assert _state(table) == {"a": (1, BUILTIN, None), "b": (10, BUILTIN, None)}
    assert table.keys() == ["a", "b"] and "a" in table and "c" not in table and table.get("c") is None


def test_removal_skips_every_entry_of_the_removed_origin(table):
    """plug overrides built-in, other overrides plug, plug overrides other: removing plug leaves other's entry, now
    over the built-in; removing other then brings back the built-in, not plug's removed entry (a bug before)."""
    table.add("k", "builtin", origin=BUILTIN)
    table.add("k", "plug-1", origin="plug", override=True)
    table.add("k", "other", origin="other", override=True)
    table.add("k", "plug-2", origin="plug", override=True)
    table.remove_origin("plug")
    assert _state(table) == {"k": ("other", "other", BUILTIN)}
    table.remove_origin("other")
    assert _state(table) == {"k": ("builtin", BUILTIN, None)}
    table.remove_origin(BUILTIN)
    assert len(table) == 0
    # a plugin's free key overridden by another plugin: removing the first leaves the second overriding nothing
    table.add("free", "first", origin="plug")
    table.add("free", "second", origin="other", override=True)
    table.remove_origin("plug")
    assert _state(table) == {"free": ("second", "other", None)}
    assert table.get("free").replaced is None and table.get("free").override_note == ""


def test_check_raises_like_add_and_changes_nothing(table):
    table.add("a", 1, origin="one")
    table.check("a", 2, origin="one")
    table.check("a", 2, origin="two", override=True)
    table.check("b", 2, origin="two")
    with pytest.raises(RegistrationConflict, match="widget 'a' from plugin 'two' .<2>. is already registered by "
                                                   "plugin 'one' .<1>."):
        table.check("a", 2, origin="two")
    assert _state(table) == {"a": (1, "one", None)}


def test_snapshots_of_every_table_restore_them(table):
    table.add("a", 1, origin=BUILTIN)
    state = registration.snapshot_all()
    assert any(t is table for t, _ in state)
    table.add("b", 2, origin="plug")
    table.add("a", 3, origin="plug", override=True)
    registration.restore_all(state)
    assert _state(table) == {"a": (1, BUILTIN, None)}
    snap = table.snapshot()
    table.add("c", 1, origin="plug")
    assert "c" not in snap  # a copy, not the live table
    table.restore(snap)
    assert table.keys() == ["a"]
    table.add("d", 4, origin="plug")
    assert "d" not in snap  # restoring does not share the snapshot either
    table.add("a", 5, origin="gone", override=True)
    registration.remove_origin_everywhere("gone")
    registration.remove_origin_everywhere("plug")
    assert _state(table) == {"a": (1, BUILTIN, None)}


def test_origin_label_and_registration_defaults():
    assert registration.origin_label(BUILTIN) == "built-in"
    assert registration.origin_label("x") == "plugin 'x'"
    r = Registration("k", 1, "x")
    assert (r.overrides, r.replaced, r.override_note) == (None, None, "")


def test_who_is_registering():
    assert registration._current_origin.get() is None
    # no plugin loading: the source given, else the package of the registering module (kvpress counts as built-in)
    assert registration.resolve_origin("src", "mypkg.mod") == "src"
    assert registration.resolve_origin(None, "mypkg.sub.mod") == "mypkg"
    assert registration.resolve_origin(None, "kvpress.presses.x") == BUILTIN
    assert registration.resolve_origin(None, "kvpress_ext.presses.rkv") == BUILTIN
    assert registration.resolve_origin(None, "") == "unknown"
    with registration.registering_as("plug"):
        assert registration.resolve_origin("src", "mypkg.mod") == "plug"  # the plugin wins over what it claims
        assert registration.resolve_origin(None, "kvpress_ext.presses.rkv") == "plug"
        # a kvpress_ext class decorating itself while a plugin's import runs stays built-in
        assert registration.resolve_origin(None, "kvpress_ext.presses.rkv", self_registration=True) == BUILTIN
        assert registration.resolve_origin(None, "mypkg.mod", self_registration=True) == "plug"
        with registration.registering_as("inner"):
            assert registration.resolve_origin(None, "m") == "inner"
        assert registration.resolve_origin(None, "m") == "plug"
    assert registration.resolve_origin(None, "m") == "m"
    with pytest.raises(RuntimeError), registration.registering_as("boom"):
        raise RuntimeError
    assert registration._current_origin.get() is None  # reset even when the body raises


def _calls_caller_module():
    return registration.caller_module()


def test_caller_module_is_the_module_that_called_the_registering_function():
    assert _calls_caller_module() == __name__


def test_ensure_loaded_calls_the_installed_loader():
    previous = registration._loader
    calls = []
    try:
        registration.set_loader(lambda: calls.append(1))
        registration.ensure_loaded()
        registration.ensure_loaded()
        assert calls == [1, 1]
        registration.set_loader(None)
        registration.ensure_loaded()  # no loader: nothing to do
        assert calls == [1, 1]
    finally:
        registration.set_loader(previous)
