"""How an evaluation builds a press from a name and a compression ratio, and how it names what the press was asked
to do: shared by the perplexity sweep (:mod:`kvpress_ext.evaluation.runners.perplexity`) and the long-context grid
(:mod:`kvpress_ext.evaluation.runners.longcontext`), so both put every press at the same KV budget."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from kvpress_ext.core.contract import (
    budget_parameters,
    composed_presses,
    from_compression_ratio,
    sized_by_budget,
    takes_compression_ratio,
)
from kvpress_ext.core.errors import NoCompressionWarning, PressParameterError
from kvpress_ext.core.registry import available_presses, get_press, press_info, press_name, validate_parameters


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise PressParameterError(
            f"--compression_ratio {ratio} is out of range; it must be in [0, 1) (the fraction of the cache to remove)."
        )


def build_press(name: str, compression_ratio: float | None, press_kwargs: dict, context_length: int | None = None):
    """(press, ratio used or None): ``compression_ratio`` goes to presses that have it; a press with a token
    budget instead that defines ``from_compression_ratio(ratio, context_length, **kwargs)`` (lazy_streaming,
    rkv) gets the budget that keeps ``1 - ratio`` of a ``context_length``-token window; others keep theirs."""
    info = press_info(name)  # unknown names: error with close names
    if info.cls is type(None) or name == "no_press":
        if press_kwargs:
            raise PressParameterError(f"Press 'no_press' takes no parameters (got {', '.join(press_kwargs)}); leave them out "
                                      "or choose a press that compresses.")
        return None, None
    budget_given = any(k in press_kwargs for k in budget_parameters(info.cls))
    if compression_ratio is not None and context_length and sized_by_budget(info.cls) and not budget_given:
        validate_parameters(info.cls, {**info.defaults, **press_kwargs}, name)
        press = from_compression_ratio(info.cls, compression_ratio, context_length, **{**info.defaults, **press_kwargs})
        return press, compression_ratio
    # Only to presses that have a ratio (their own or forwarded, as AdaKV's): a decoding press's scorer ratio is
    # overridden by its target size, so passing it there would only report a ratio that was not used.
    has_ratio = any(p.name == "compression_ratio" for p in info.parameters) or takes_compression_ratio(info.cls)
    if compression_ratio is not None and "compression_ratio" not in press_kwargs and has_ratio:
        try:
            return get_press(name, compression_ratio=compression_ratio, **press_kwargs), compression_ratio
        except PressParameterError as exc:
            if "'compression_ratio'" not in str(exc):
                raise
    return get_press(name, **press_kwargs), press_kwargs.get("compression_ratio")


def press_params(press) -> dict:
    """A press's dataclass fields, inner presses as {name, params}, for the JSON record."""
    if press is None or not dataclasses.is_dataclass(press):
        return {}
    out = {}
    for f in dataclasses.fields(press):
        if not f.init or f.name.startswith("_"):
            continue
        v = getattr(press, f.name, None)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = {"name": press_name(v), "params": press_params(v)}
        elif isinstance(v, (list, tuple)) and any(dataclasses.is_dataclass(x) for x in v):
            v = [{"name": press_name(x), "params": press_params(x)} for x in v]
        elif isinstance(v, torch.Tensor) or callable(v):
            v = repr(v)[:80]
        out[f.name] = v
    return out


def press_setting(name: str, press, ratio) -> str:
    """How the press was asked to compress, in words for the table (never ``ratio=None``)."""
    if press is None:
        return "uncompressed" if name == "no_press" else "-"
    budget = [k for k in budget_parameters(type(press)) if getattr(press, k, None) is not None]
    if budget:
        extra = [k for k in ("slack",) if getattr(press, k, None) is not None]
        text = ", ".join(f"{k}={getattr(press, k)}" for k in budget + extra)
        return f"{text} (from compression_ratio={ratio})" if ratio is not None else text
    if ratio is not None:
        return f"compression_ratio={ratio}"
    inner = composed_presses(press)
    if inner:  # a composition: each press's own setting, in order
        return " then ".join(f"{press_name(p)} ({press_setting(press_name(p), p, None)})" for p in inner)
    params = press_params(press)
    sized = {k: v for k, v in params.items() if any(w in k for w in ("ratio", "budget", "target_size", "window", "cap"))
             and not isinstance(v, (dict, list))}
    return ", ".join(f"{k}={v}" for k, v in sized.items()) or "its own rule (no ratio or budget)"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def sweep_jobs(compression_ratio: float, context_length: int | None = None) -> list[tuple]:
    """Every registered press built with its registry defaults (+ the ratio where it applies); a press that needs
    something unavailable, or fails to build, is kept with the reason instead of a press."""
    jobs = []
    for name, info in available_presses().items():
        if info.requires:
            jobs.append((name, None, None, f"requires {info.requires}"))
            continue
        try:
            with warnings.catch_warnings():  # a sweep at ratio 0 is a choice, not a mistake
                warnings.simplefilter("ignore", NoCompressionWarning)
                press, ratio = build_press(name, compression_ratio, {}, context_length)
        except Exception as exc:  # noqa: BLE001
            jobs.append((name, None, None, f"cannot be built from its name alone: {first_line(exc)}"))
            continue
        jobs.append((name, press, ratio, None))
    return sorted(jobs, key=lambda job: job[0] != "no_press")  # the baseline first: every later line compares to it


