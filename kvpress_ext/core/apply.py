"""Run a press on a model through its adapter: the one place where press hooks are installed.

``apply_press(press, model)`` replaces kvpress's ``BasePress.__call__`` for kvpress_ext: it finds the
model's adapter, registers ``press.forward_hook`` on every attention module the adapter compresses, hands the
press the adapter's Llama-shaped view of the module (the module itself for Llama-family models; see
:mod:`kvpress_ext.core.adapters.gpt_neox` for GPT-NeoX), and tracks positions (:mod:`kvpress_ext.core.positions`).
The hooks live only inside the ``with`` block; kvpress itself is not modified.

Inputs a press cannot handle: kvpress checks its inputs with bare ``assert``s. One about the attention
implementation (eager weights needed or refused) becomes a :class:`PressInputError` naming the press and the fix.
Any other (an input shorter than the press needs, e.g. SnapKV's ``window_size`` on a 16-token context, or a
prefill-only press shown a chunk after the first) leaves that forward's cache uncompressed, with one
:class:`PressSkippedWarning` per press that says so: a short context must not crash a first call, and the caller
still gets a correct (uncompressed) answer. kvpress's own log lines are shown once per message, not once per layer.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack, contextmanager, nullcontext

import torch

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.batch import per_row_after_forward, per_row_forward_hook, row_lengths_follow_cache
from kvpress_ext.core.contract import (
    batch_refusal,
    contract_of,
    drives_model,
    first_skip_warning,
    inner_press,
    positions_follow_cache,
    reset_press,
)
from kvpress_ext.core.errors import PressInputError, PressSkippedWarning, UnsupportedModelError
from kvpress_ext.core.positions import (
    BatchInputError,
    count_positions,
    padded_batch,
    position_state,
    set_next_position,
    track_positions,
)
from kvpress_ext.core.registry import available_presses, press_name


def manages_whole_cache(press) -> bool:
    """Presses with ``after_forward(cache)``, called once per forward pass after every layer has attended.

    For a press whose decision does not depend on the layer's attention inputs (StreamingLLM-style
    eviction by position), compacting every layer after the forward equals compacting each layer right
    after its own attention (no layer reads another layer's cache), and it costs one Python hook per
    forward instead of one per layer: the per-token overhead that matters when decoding small models.
    The press works on the real cache tensors (natural basis, partial rotary on GPT-NeoX) through the adapter.
    """
    return press is not None and contract_of(press).whole_cache


def about_attention_implementation(exc: BaseException) -> bool:
    """Whether a press's assertion is about the attention kernel (eager weights needed or refused)."""
    text = str(exc).lower()
    return "attention" in text or "eager" in text


def _user_facing_name(press) -> str:
    """The registry name of the press a user chose, looking through internal wrappers (EveryChunkPress)."""
    registered = {info.cls for info in available_presses().values()}
    while type(press) not in registered and inner_press(press) is not None:
        press = inner_press(press)
    return press_name(press)


def _input_refused(press, exc: AssertionError, hidden_states) -> None:
    """A press refused its input: raise (attention kernel) or warn once per press and compress nothing."""
    name = _user_facing_name(press)
    reason = str(exc).strip() or "assertion failed"
    if about_attention_implementation(exc):
        raise PressInputError(
            f"{name} cannot compress this input: {reason}. Change its parameters (see `kvpress-ext describe "
            f"{name}`) or the attention implementation."
        ) from exc
    if not first_skip_warning(press):
        return
    n = hidden_states.shape[1] if hidden_states is not None else "?"
    warnings.warn(
        f"{name} did not compress a {n}-token input ({reason}); the cache keeps every token of it. Give it a "
        f"longer input or change its parameters (`kvpress-ext describe {name}`).",
        PressSkippedWarning, stacklevel=2,
    )


def _press_hook(press, adapter, model):
    def run(view, args, hook_kwargs, output):
        try:
            return press.forward_hook(view, args, hook_kwargs, output)
        except AssertionError as exc:  # kvpress checks its inputs with asserts: say which press and what to do
            if isinstance(exc, PressInputError):
                raise
            _input_refused(press, exc, hook_kwargs.get("hidden_states"))
            return output

    def hook(module, args, kwargs, output):
        view = adapter.press_view(model, module)
        hook_kwargs = adapter.hook_kwargs(module, args, kwargs)
        if padded_batch(hook_kwargs.get("past_key_values")) is not None:
            return per_row_forward_hook(run, view, list(args), hook_kwargs, output)  # each sequence as if alone
        return run(view, list(args), hook_kwargs, output)

    return hook


def check_batches(press, padded: bool) -> None:
    """Refuse a padded batch for a press whose contract does not claim batches: one line naming the press and why,
    never a wrong answer."""
    if padded and press is not None and not contract_of(press).batches:
        raise BatchInputError(f"{_user_facing_name(press)} cannot compress a padded batch ({batch_refusal(press)}): "
                              "run it one sequence at a time (batch_size=1) or with sequences of equal length.")


def _refuse_padded_batches(press):
    """A pre-hook that stops a padded batch before the model runs (:func:`check_batches`)."""
    def hook(module, args, kwargs):
        check_batches(press, padded_batch(kwargs.get("past_key_values")) is not None)

    return hook


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once per process (kvpress logs some per layer and per forward)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = _OncePerMessage()
_QUIET = False  # set by the command line; apply_press then also covers kvpress loggers created later


def quiet_repeated_kvpress_logs(enable: bool = True) -> None:
    """Attach (or with ``enable=False`` detach) the once-per-message filter on every kvpress logger.

    The command line calls it (:func:`kvpress_ext.cli.common.quiet_command_line`); importing kvpress_ext does
    not, so a library user's logging, and the takeover of kvpress's pipeline, see every record kvpress emits."""
    global _QUIET
    _QUIET = enable
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not ((name == "kvpress" or name.startswith("kvpress.")) and isinstance(logger, logging.Logger)):
            continue
        if enable and _ONCE not in logger.filters:
            logger.addFilter(_ONCE)
        elif not enable:
            logger.removeFilter(_ONCE)



def _after_forward_hook(press):
    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if cache is None:  # the model made its own cache
            cache = getattr(output, "past_key_values", None)
        if cache is not None and padded_batch(cache) is not None:
            per_row_after_forward(press, cache)
        elif cache is not None:
            press.after_forward(cache)
        return output

    return hook


def cache_length_hook(module, args, kwargs, output):
    """After each forward the next position is the cache length (per sequence in a padded batch), read on the first
    layer that is not a sliding-window one (transformers' ``config.layer_types``): presses compress those, while
    sliding-window layers (Gemma 3) keep their own length. ``module`` is the decoder."""
    cache = kwargs.get("past_key_values")
    if cache is not None and padded_batch(cache) is not None:
        row_lengths_follow_cache(cache)
    elif cache is not None:
        types = getattr(getattr(module, "config", None), "layer_types", None) or []
        layer = next((i for i, kind in enumerate(types) if kind != "sliding_attention"), 0)
        set_next_position(cache, cache.get_seq_length(layer))


def _follow_moved_positions(adapter, model):
    """Hooks that keep layers no press compresses (sliding-window layers) in step when a press moves positions.

    A press that re-rotates the keys it keeps sets the next RoPE position of the whole model; the keys of the
    untouched layers are then rotated by the same shift, so every query-key distance there stays what it was.
    Returns (pre-hook, hook) for the decoder: the pre-hook notes where positions would be without the press."""
    expected = {}

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None:
            expected[id(cache)] = position_state(cache).next_position  # after track_positions advanced it

    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if cache is not None and id(cache) in expected:
            shift_untouched_layers(adapter, model, cache, position_state(cache).next_position - expected.pop(id(cache)))

    return pre_hook, hook


def shift_untouched_layers(adapter, model, cache, shift: int) -> None:
    """Rotate the keys of every layer presses leave alone by ``shift`` positions (each with its own RoPE base)."""
    if not shift:
        return
    compressed = set(adapter.compressed_layers(model))
    for i, layer in enumerate(cache.layers):
        if i not in compressed and layer.keys is not None and layer.keys.numel():
            zero = torch.zeros(1, device=layer.keys.device)
            layer.keys = adapter.rerotate_keys(model, layer.keys, zero, zero + shift, layer=i)


@contextmanager
def _owning_its_passes(press, model, decoder, track: bool):
    """A press that runs the model (KVzip, RestoreKV, KVCompose, Finch) inside its own context manager owns every
    pass there, as in kvpress: the caller's passes and the press's extra ones (a reconstruction pass, a second pass
    over the context, restore tokens) take their positions from the cache length, untouched by us. Only the
    caller's tokens advance the position state; a press that moves positions leaves the next one at the cache
    length once its context has closed (its extra passes included)."""
    caches: list = []
    with press(model), count_positions(decoder, caches) if track else nullcontext():
        yield
    if track and positions_follow_cache(press):
        for cache in caches:
            set_next_position(cache, cache.get_seq_length())


@contextmanager
def apply_press(press, model, *, track=True):
    """Context manager: ``press`` compresses the KV cache of every forward pass of ``model`` inside it.

    ``press=None`` only tracks positions. ``track=False`` skips position tracking (for callers that
    manage positions themselves, e.g. a reference implementation).
    """
    adapter = get_adapter(model)
    decoder = adapter.decoder(model)
    if _QUIET:
        quiet_repeated_kvpress_logs()  # loggers of presses imported since the command started
    if drives_model(press):
        if not adapter.runs_model_presses:
            raise UnsupportedModelError(
                f"{type(press).__name__} runs the model itself (not only attention hooks) and supports "
                f"Llama-family models only, not {adapter.name}. Pick a hook-based press (e.g. knorm, snapkv)."
            )
        with _owning_its_passes(press, model, decoder, track):
            yield
        return
    with ExitStack() as stack:
        if track:
            stack.enter_context(track_positions(decoder))
        if press is None:
            yield
            return
        if not contract_of(press).batches:
            handle = decoder.register_forward_pre_hook(_refuse_padded_batches(press), with_kwargs=True)
            stack.callback(handle.remove)
        if manages_whole_cache(press):
            press.post_init_from_model(model)
            handle = decoder.register_forward_hook(_after_forward_hook(press), with_kwargs=True)
            stack.callback(handle.remove)
            stack.callback(reset_press, press)
        else:
            press.post_init_from_model(model)
            hook = _press_hook(press, adapter, model)
            modules = adapter.attention_modules(model)
            for i in adapter.compressed_layers(model):
                handle = modules[i].register_forward_hook(hook, with_kwargs=True)
                stack.callback(handle.remove)
            stack.callback(reset_press, press)
        compressed = adapter.compressed_layers(model)
        if positions_follow_cache(press):
            handle = decoder.register_forward_hook(cache_length_hook, with_kwargs=True)
            stack.callback(handle.remove)
        untouched = sorted(set(range(len(adapter.layers(model)))) - set(compressed))
        if track and untouched:  # registered last: runs after every press has moved positions
            pre_hook, hook = _follow_moved_positions(adapter, model)
            for handle in (decoder.register_forward_pre_hook(pre_hook, with_kwargs=True),
                           decoder.register_forward_hook(hook, with_kwargs=True)):
                stack.callback(handle.remove)
        yield
