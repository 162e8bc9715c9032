"""Checks before a perplexity sweep starts: can the model load (locally by loading it, for Ray from its config), and
can each press run in the sweep's mode (tried on a short piece of the text), so the unsupported ones are listed with
their reason before any cell runs."""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING

from transformers import AutoConfig

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.contract import forget_skip_warning, reset_press
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import NoCompressionWarning, PressSkippedWarning, UnsupportedModelError
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation.press_setup import build_press, first_line
from kvpress_ext.evaluation.speed import _one_run
from kvpress_ext.runtime import hub
from kvpress_ext.runtime.models import MODEL_ALTERNATIVES, ModelLoadError, resolve_model, retry_with_other_attention

if TYPE_CHECKING:  # annotations only
    from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig


def probe_support(model, input_ids, press, args: PerplexityConfig) -> str | None:
    """Why ``press`` cannot run in the mode ``args`` describe, found by running it on a short piece of the text
    (two chunks of the perplexity run, a prefill and two decoded tokens of the speed run), or None if it can.

    A press that raises, or that leaves an input uncompressed because it cannot handle it (a prefill-only press
    shown a second chunk), is unsupported in that mode; the reason is its own message, first line. When it fails
    on chunks but works on one whole prefill, the reason says so and names the mode it can run in."""
    n = min(args.context_limit, input_ids.shape[1])
    device = input_device(model)
    chunked = args.ppl_apply_press and not (args.speed_only or args.speed_decode_only)

    def perplexity_part():
        probe = input_ids[:, : min(n, 2 * args.chunk_size)]
        ppl.compressed_nll(model, probe, press, probe.shape[1], args.chunk_size, args.decode_chunk_size)

    def speed_part():
        _one_run(model, input_ids[:, : min(args.speed_context or n, input_ids.shape[1])].to(device), press, 3, 0)

    parts = ([perplexity_part] if chunked else []) + ([] if args.no_speed else [speed_part])
    reason = _try(model, press, parts)
    if reason and chunked and _try(model, press, [speed_part]) is None:
        return (f"works on one whole prefill but not on a text fed in chunks into a compressed cache ({reason}); "
                "evaluate it with --no_ppl_press")
    return reason


def _try(model, press, steps) -> str | None:
    """Run ``steps`` under ``press`` (retrying once with the other attention kernel, as the sweep does); the first
    line of what went wrong, or None. A :class:`PressSkippedWarning` (input left uncompressed) counts as wrong."""
    def attempt() -> str | None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PressSkippedWarning)
            for step in steps:
                step()
        for w in caught:
            if issubclass(w.category, PressSkippedWarning):
                return str(w.message).split(" (", 1)[-1].split("); ")[0]
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return None

    try:
        return retry_with_other_attention(model, attempt)[0]
    except Exception as exc:  # noqa: BLE001 - any failure makes the press unsupported here; its message says why
        return first_line(exc)
    finally:
        reset_press(press)
        forget_skip_warning(press)


def mode_text(args: PerplexityConfig) -> str:
    if args.speed_only or args.speed_decode_only:
        return "speed only"
    mode = (f"--ppl_apply_press (chunks of {args.chunk_size} tokens into a compressed cache)" if args.ppl_apply_press
            else "perplexity without the press, speed with it")
    return mode + ("" if args.no_speed else " + speed")


def check_sweep(model, input_ids, jobs: list[tuple], args: PerplexityConfig) -> list[tuple]:
    """Try every press of a sweep in the sweep's mode before it starts; print those that cannot run, with why."""
    checked, unsupported, skipped = [], [], []
    for name, press, ratio, skip in jobs:
        if skip:
            skipped.append((name, skip))
            checked.append((name, press, ratio, f"skipped: {skip}"))
            continue
        reason = probe_support(model, input_ids, press, args) if press is not None else None
        if reason:
            unsupported.append((name, reason))
            checked.append((name, press, ratio, f"unsupported: {reason}"))
        else:
            checked.append((name, press, ratio, None))
    print(f"{len(checked) - len(unsupported) - len(skipped)} of {len(checked)} presses run in this mode "
          f"({mode_text(args)}).")
    if unsupported:
        print(f"Unsupported in this mode ({len(unsupported)}):")
        for name, reason in unsupported:
            print(f"  {name}: {reason}")
    if skipped:
        print(f"Skipped ({len(skipped)}; they need something not available here):")
        for name, reason in skipped:
            print(f"  {name}: {reason}")
    sys.stdout.flush()
    return checked




def check_model(name: str) -> None:
    """Fail before any cell on a model that cannot load, from its config only (a Ray driver may have no GPU; a
    local run checks by loading it)."""
    source = resolve_model(name)
    hub.check_model_source(source, name, MODEL_ALTERNATIVES)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load model {name!r}: {str(exc).strip().splitlines()[0][:300]}") from exc
    stand_in = type((config.architectures or ["Model"])[0], (), {"config": config})()
    try:
        get_adapter(stand_in)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(str(exc).split(". To add")[0] + ".") from exc


def check_context(name: str, context_limit: int, speed_context: int | None) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``), from its config alone, before
    it loads: beyond it a model with learned positions fails and one with RoPE scores text it was never trained on.
    A config that cannot be read here is left to loading, which says why."""
    source = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return
    for flag, value in (("--context_limit", context_limit), ("--speed_context", speed_context)):
        if value is not None and value > limit:
            raise ModelLoadError(f"{flag} {value} is beyond the context of model {name!r} ({limit:,} tokens, its "
                                 f"max_position_embeddings); pass {flag} {limit} or less.")


def whole_prefill_only(args: PerplexityConfig, cells: list, model, input_ids) -> None:
    """One press under ``ppl_apply_press``: if it can compress one whole prefill but not a text fed in chunks, its
    perplexity is measured without it (the speed run still applies it) and its record says why."""
    if not args.ppl_apply_press or args.speed_only or args.speed_decode_only:
        return
    for cell in cells:
        config = cell.params["config"]
        if config["press"] == "no_press":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoCompressionWarning)
            press, _ = build_press(config["press"], config["compression_ratio"], dict(config["press_kwargs"]),
                                   args.context_limit)
        reason = probe_support(model, input_ids, press, args) if press is not None else None
        if reason and reason.startswith("works on one whole prefill"):
            config["ppl_apply_press"] = False
            cell.params["ppl_note"] = "perplexity without the press: it " + reason.split(" (", 1)[0]


def mark_unsupported(args: PerplexityConfig, cells: list, model, input_ids) -> None:
    """``--press all``: try every press of the sweep in its mode before it starts (:func:`check_sweep`, on this
    process's model) and record in each cell that cannot run there why, so the cell writes that instead."""
    several = len({c.params["config"]["compression_ratio"] for c in cells}) > 1
    jobs = []
    for cell in cells:
        config = cell.params["config"]
        press = ratio = None
        if not cell.params["skip"] and config["press"] != "no_press":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoCompressionWarning)
                press, ratio = build_press(config["press"], config["compression_ratio"], dict(config["press_kwargs"]),
                                           args.context_limit)
        jobs.append((cell.key if several else config["press"], press, ratio, cell.params["skip"]))
    for cell, (_, _, _, skip) in zip(cells, check_sweep(model, input_ids, jobs, args)):
        cell.params["skip"] = skip
