"""Old flat module paths still import, as the same module objects, with a warning naming the new path."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import kvpress_ext
from kvpress_ext.moved_modules import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_a_class_imported_through_an_old_path_is_the_same_class():
    sys.modules.pop("kvpress_ext.adapters.llama", None)
    with pytest.warns(DeprecationWarning):
        from kvpress_ext.adapters.llama import LlamaFamilyAdapter as old
    from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter as new

    assert old is new


def test_no_old_path_is_left_as_a_file_beside_its_new_home():
    root = Path(kvpress_ext.__path__[0]).parent
    for old in MOVED:
        stem = root.joinpath(*old.split("."))
        assert not stem.with_suffix(".py").exists() and not (stem / "__init__.py").exists(), old


def test_the_old_plugins_module_api_is_on_the_package():
    from kvpress_ext.plugins import failed_plugins, load_plugins, loader

    assert (failed_plugins, load_plugins) == (loader.failed_plugins, loader.load_plugins)
