"""The press contract: everything kvpress-ext may ask of a press, declared in one place.

A press is any kvpress ``BasePress`` (or an object with the same ``forward_hook`` / ``post_init_from_model``
methods). What the toolkit needs to know beyond that (when it compresses, how it is sized, what it does to
positions, whether it handles padded batches) is a :class:`PressContract`. Code that drives presses asks
:func:`contract_of` and the helpers below, never ``hasattr`` on the press.

How a press gets its contract, first match wins:

1. **It declares one**: a class attribute ``contract = PressContract(...)``, or a method
   ``press_contract(self) -> PressContract`` when it depends on the instance's parameters. This is what a
   third-party plugin author writes; every field has a default, so declaring only what differs is enough.
2. **A kvpress class with special needs**: :data:`KVPRESS_CONTRACTS` maps the class (through its MRO) to a
   function of the instance (``DecodingPress`` compresses only while decoding, ``KeyRerotationPress`` moves
   positions, ...). One table, by class.
3. **Anything else**: the defaults: compresses once at prefill through per-layer attention hooks, positions
   untouched, one sequence at a time. Every kvpress scorer press is this case and runs unmodified.

A press whose ``__call__`` is not kvpress's hook-installing one (KVzip, Finch, RestoreKV) runs the model itself:
:attr:`PressContract.runs_model` is then true whatever the source, and such a press owns every forward pass it
makes (positions are its own business, as they are in kvpress).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import kvpress
from kvpress import (
    AdaKVPress,
    BasePress,
    CompactorPress,
    CURPress,
    DecodingPress,
    DMSPress,
    FinchPress,
    KeyRerotationPress,
    LeverageScorePress,
    PrefillDecodingPress,
    RandomPress,
    ScorerPress,
)

__all__ = [
    "KVPRESS_CONTRACTS",
    "PressContract",
    "batch_refusal",
    "budget_parameters",
    "composed_presses",
    "contract_of",
    "first_skip_warning",
    "forget_skip_warning",
    "from_compression_ratio",
    "fuses_chunks",
    "inner_press",
    "prefill_chunk_size",
    "reset_press",
    "sized_by_budget",
    "takes_compression_ratio",
]


@dataclass(frozen=True)
class PressContract:
    """What a press does, as the toolkit reads it. Defaults describe a plain kvpress scorer press."""

    #: Compresses the cache at prefill (the forward that sees the context).
    prefill: bool = True
    #: Compresses during decoding (forwards after the prefill), e.g. R-KV, DecodingPress.
    decoding: bool = False
    #: Defines ``after_forward(cache)``: called once per forward pass after every layer has attended, instead of a
    #: hook per attention module (cheaper per decoded token; the press works on the real cache tensors).
    whole_cache: bool = False
    #: Its ``__call__(model)`` runs forward passes itself (KVzip's reconstruction pass, Finch's delimiter search).
    #: It owns those passes: inside its context every pass takes its positions from the cache length, as in kvpress,
    #: and only the caller's tokens advance the position state. Only Llama-family models.
    runs_model: bool = False
    #: After each forward the next RoPE position is the cache length (keys re-rotated to 0..n-1).
    positions_follow_cache: bool = False
    #: Parameters that size the press by a token budget (``budget``, ``cap_total``); given explicitly they win over
    #: a compression ratio. A press with any defines ``from_compression_ratio(ratio, context_length, **params)``.
    budget_parameters: tuple[str, ...] = ()
    #: Streams a long context in chunks of ``press.prefill_chunk_size`` tokens, compressing after each one.
    chunked_prefill: bool = False
    #: Builds the cache itself from pre-chunked contexts (A³): ``fuse(model, chunks, question_ids, prefix_ids)`` returns
    #: ``(cache, logits)``, the cache holding prefix + chunks + question; the pipeline decodes the answer from it.
    takes_context_chunks: bool = False
    #: Compresses each sequence of a left-padded batch as if it were alone (pads never kept over real tokens) when
    #: run on each sequence's own tokens (:mod:`kvpress_ext.core.batch`): its decisions read only the forward's
    #: inputs, the layer's cache and state kept on that cache, and it keeps the same count in every layer.
    batches: bool = False


def _hooks_only(cls: type) -> bool:
    """Whether ``cls.__call__`` is one of kvpress's hook-installing ones (not a press that runs the model)."""
    return cls.__call__ in (BasePress.__call__, DecodingPress.__call__, PrefillDecodingPress.__call__)


def _plain_scorer(press) -> bool:
    """A scorer whose compression is kvpress's top-k of its scores (its scores read only the forward's inputs)."""
    return type(press).compress is ScorerPress.compress


def _restore_kv() -> type | None:
    return getattr(kvpress, "RestoreKVPress", None)  # newer kvpress releases only


#: kvpress classes that need more than the defaults, by class (the most derived match in the MRO wins).
KVPRESS_CONTRACTS: dict[type, Callable[[object], PressContract]] = {
    DecodingPress: lambda press: PressContract(prefill=False, decoding=True),
    PrefillDecodingPress: lambda press: PressContract(prefill=True, decoding=True),
    DMSPress: lambda press: PressContract(prefill=True, decoding=bool(press.decoding)),
    KeyRerotationPress: lambda press: PressContract(positions_follow_cache=True, batches=_plain_scorer(press.press)),
    ScorerPress: lambda press: PressContract(batches=_plain_scorer(press)),
    # scores drawn from torch's global generator depend on what ran before, not on the sequence alone
    RandomPress: lambda press: PressContract(batches=press.seed is not None),
    LeverageScorePress: lambda press: PressContract(batches=False),
    CompactorPress: lambda press: PressContract(batches=False),
    CURPress: lambda press: PressContract(batches=not press.use_random_leverage),
    FinchPress: lambda press: PressContract(positions_follow_cache=bool(press.rerotate_keys)),
}
if _restore_kv() is not None:
    KVPRESS_CONTRACTS[_restore_kv()] = lambda press: PressContract(positions_follow_cache=True)


def _declared(press) -> PressContract | None:
    method = getattr(type(press), "press_contract", None)
    if callable(method):
        return method(press)
    declared = getattr(type(press), "contract", None)
    return declared if isinstance(declared, PressContract) else None


def _declared_by_class(cls: type) -> PressContract | None:
    declared = getattr(cls, "contract", None)
    return declared if isinstance(declared, PressContract) else None


def contract_of(press) -> PressContract:
    """The contract of ``press`` (an instance); ``None`` (no press) compresses nothing."""
    if press is None:
        return PressContract(prefill=False)
    contract = _declared(press)
    if contract is None:
        for cls in type(press).__mro__:
            if cls in KVPRESS_CONTRACTS:
                contract = KVPRESS_CONTRACTS[cls](press)
                break
        else:
            contract = PressContract()
    if not contract.runs_model and not _hooks_only(type(press)) and not _declared(press):
        contract = replace(contract, runs_model=True)
    return contract


def budget_parameters(cls: type) -> tuple[str, ...]:
    """The token-budget parameters of a press class (empty for ratio-sized presses)."""
    declared = _declared_by_class(cls)
    return declared.budget_parameters if declared is not None else ()


def sized_by_budget(cls: type) -> bool:
    """Whether a press class is sized by a token budget and builds itself from a ratio (lazy_streaming, rkv)."""
    return bool(budget_parameters(cls))


def from_compression_ratio(cls: type, compression_ratio: float, context_length: int, **params):
    """A budget-sized press at the same KV budget as a ratio press: ``(1 - ratio) x context_length`` tokens."""
    if not sized_by_budget(cls):
        raise TypeError(f"{cls.__name__} is sized by compression_ratio, not a token budget")
    return cls.from_compression_ratio(compression_ratio, context_length, **params)


def prefill_chunk_size(press) -> int | None:
    """Tokens per prefill chunk for a press that compresses as a long context streams in, else None."""
    return press.prefill_chunk_size if contract_of(press).chunked_prefill else None


def fuses_chunks(press) -> bool:
    """Whether the press builds the cache from pre-chunked contexts with ``fuse`` (A³)."""
    return contract_of(press).takes_context_chunks


def reset_press(press) -> None:
    """Forget per-sequence state (call counters, per-layer statistics) of the press and of a decoding press it
    wraps, so the next sequence starts fresh; presses without state have no ``reset`` and are left alone."""
    for part in (press, getattr(press, "decoding_press", None)):
        reset = getattr(part, "reset", None)
        if callable(reset):
            reset()


#: Why a kvpress class cannot run a padded batch, by class (most derived match in the MRO wins).
_RANDOM = "its scores draw from torch's global random generator, so a sequence's kept tokens would depend on the others"
_BATCH_REFUSALS: dict[type, str] = {
    RandomPress: _RANDOM + " (give it a seed)",
    LeverageScorePress: _RANDOM,
    CompactorPress: _RANDOM,
    CURPress: _RANDOM,
    DecodingPress: "it counts decoding steps for the whole batch, not per sequence",
    PrefillDecodingPress: "its decoding press counts steps for the whole batch, not per sequence",
    AdaKVPress: "it masks keys inside the attention kernel for the whole batch",
    DMSPress: "it masks keys inside the attention kernel for the whole batch",
}


def batch_refusal(press) -> str:
    """Why ``press`` does not run padded batches (for the error that refuses one)."""
    if contract_of(press).runs_model:
        return "it runs the model itself, one sequence at a time"
    for cls in type(press).__mro__:
        if cls in _BATCH_REFUSALS:
            return _BATCH_REFUSALS[cls]
    if isinstance(press, ScorerPress):
        return "its compression is not kvpress's per-sequence top-k: it may keep different counts per layer or head"
    return "it does not declare that it compresses each sequence as if alone (PressContract.batches)"


def inner_press(press):
    """The press a wrapper wraps (``KeyRerotationPress.press``, our chunk wrappers), else None."""
    inner = getattr(press, "press", None)
    return inner if inner is not None and not isinstance(inner, (str, type)) else None


_SKIP_WARNED = "_kvpress_ext_skip_warned"


def first_skip_warning(press) -> bool:
    """True the first time a press refuses an input (then it warns once); False afterwards. A press with
    ``__slots__`` cannot carry the mark and warns every time rather than never."""
    if vars(press).get(_SKIP_WARNED, False) if hasattr(press, "__dict__") else False:
        return False
    try:
        setattr(press, _SKIP_WARNED, True)
    except AttributeError:
        pass
    return True


def forget_skip_warning(press) -> None:
    """Let the press warn again (a sweep probes it on a short text first, then runs it for real)."""
    if press is not None and hasattr(press, "__dict__"):
        vars(press).pop(_SKIP_WARNED, None)


def compression_phases(press) -> tuple[bool, bool]:
    """(compresses at prefill, compresses during decoding) for any press, kvpress's or ours."""
    contract = contract_of(press)
    return contract.prefill, contract.decoding


def drives_model(press) -> bool:
    """Whether a press runs the model itself in ``__call__`` (KVzip, Finch, ...), not just hooks."""
    return press is not None and contract_of(press).runs_model


def positions_follow_cache(press) -> bool:
    """Presses that re-rotate kept keys to 0..n-1: the next position is the cache length."""
    return press is not None and contract_of(press).positions_follow_cache


def decoding_compressor(press):
    """The press whose compression runs while decoding: a DecodingPress's scorer (``base_press``), also through a
    PrefillDecodingPress's ``decoding_press``; the press itself otherwise (R-KV, lazy streaming)."""
    decoding = getattr(press, "decoding_press", None)
    inner = getattr(decoding if decoding is not None else press, "base_press", None)
    return inner if inner is not None and not isinstance(inner, (str, type)) else press


def compression_ratio_of(press):
    """``press.compression_ratio``, or None where there is none or it cannot be read yet."""
    try:  # some presses (DMS, SimLayerKV) compute it from the last forward and raise before one
        return getattr(press, "compression_ratio", None)
    except Exception:  # noqa: BLE001
        return None


def has_settable_ratio(press) -> bool:
    """Whether ``press.compression_ratio`` is a number we can set (ScorerPress, AdaKV, ...)."""
    ratio = compression_ratio_of(press)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        return False
    try:
        press.compression_ratio = ratio
    except (AttributeError, TypeError):
        return False
    return True


def composed_presses(press) -> list:
    """The presses a composition applies in turn (``ComposedPress.presses``), else an empty list."""
    inner = getattr(press, "presses", None)
    return [p for p in inner if not isinstance(p, (str, type))] if isinstance(inner, (list, tuple)) else []


def takes_compression_ratio(cls: type) -> bool:
    """Whether a press class is sized by a ``compression_ratio``: its own parameter, or one it forwards to an inner
    press as a property (AdaKV)."""
    return "compression_ratio" in getattr(cls, "__dataclass_fields__", {}) or hasattr(cls, "compression_ratio")
