"""The one model cache of every evaluation.

A sweep cell gets plain parameters, never a model (:mod:`kvpress_ext.evaluation.sweep`), so each cell function asks
:func:`get_model` for its model by name and loading options: a local run then loads a model once for all its cells,
and each Ray worker once for the cells it runs. The two most recently used models stay loaded (a grid alternating
two models does not reload them; a sweep over many models does not keep them all in memory). Tests put tiny
models in with :func:`preload_model`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable

from kvpress_ext.runtime.models import load_model

MAX_MODELS = 2
_MODELS: OrderedDict = OrderedDict()  # key -> (model, tokenizer)
_EXTRAS: dict = {}  # (key, what) -> value measured once per loaded model


def _key(name, load_kwargs: dict) -> str:
    return json.dumps([str(name), sorted((k, v) for k, v in load_kwargs.items() if v is not None)], default=str)


def _keep(key: str, entry: tuple) -> tuple:
    _MODELS[key] = entry
    _MODELS.move_to_end(key)
    while len(_MODELS) > MAX_MODELS:
        old, _ = _MODELS.popitem(last=False)
        for extra in [k for k in _EXTRAS if k[0] == old]:
            del _EXTRAS[extra]
    return entry


def get_model(name, **load_kwargs) -> tuple:
    """(model, tokenizer) of :func:`kvpress_ext.runtime.models.load_model` ``(name, **load_kwargs)``, loaded once per
    process (options left at None are the loader's defaults, so they share an entry with omitted ones)."""
    key = _key(name, load_kwargs)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    return _keep(key, load_model(name, **{k: v for k, v in load_kwargs.items() if v is not None}))


def preload_model(name, model, tokenizer, **load_kwargs) -> None:
    """Make :func:`get_model` return an already built model for ``name`` (tests with tiny random models)."""
    _keep(_key(name, load_kwargs), (model, tokenizer))


def model_extra(name, what: str, compute: Callable, **load_kwargs):
    """``compute(model)`` for the cached model of ``(name, load_kwargs)``, computed once while it stays loaded
    (e.g. the KV bytes one token adds)."""
    model, _ = get_model(name, **load_kwargs)
    key = (_key(name, load_kwargs), what)
    if key not in _EXTRAS:
        _EXTRAS[key] = compute(model)
    return _EXTRAS[key]


def clear() -> None:
    """Forget every cached model."""
    _MODELS.clear()
    _EXTRAS.clear()
