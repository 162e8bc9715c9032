"""Run a press on a model through its adapter: the one place where press hooks are installed.

``apply_press(press, model)`` replaces kvpress's ``BasePress.__call__`` for kvpress_ext: it finds the
model's adapter, registers ``press.forward_hook`` on every attention module the adapter lists, hands the
press the adapter's Llama-shaped view of the module (the module itself for Llama-family models; see
:mod:`kvpress_ext.adapters.gpt_neox` for GPT-NeoX), and tracks positions (:mod:`kvpress_ext.positions`).
The hooks live only inside the ``with`` block; kvpress itself is not modified.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from kvpress import BasePress, DecodingPress, DMSPress, FinchPress, KeyRerotationPress, PrefillDecodingPress

from kvpress_ext.adapters import get_adapter
from kvpress_ext.adapters.llama import LlamaFamilyAdapter
from kvpress_ext.errors import PressInputError, UnsupportedModelError
from kvpress_ext.positions import set_next_position, track_positions

_HOOKABLE_CALLS = (BasePress.__call__, DecodingPress.__call__, PrefillDecodingPress.__call__)


def compression_phases(press) -> tuple[bool, bool]:
    """(compresses at prefill, compresses during decoding) for any press, kvpress's or ours."""
    if press is None:
        return False, False
    if hasattr(press, "compression_phases"):
        return tuple(press.compression_phases)
    if isinstance(press, DecodingPress):
        return False, True
    if isinstance(press, PrefillDecodingPress):
        return True, True
    if isinstance(press, DMSPress):
        return True, bool(press.decoding)
    return True, False


def drives_model(press) -> bool:
    """Whether a kvpress press runs the model itself in ``__call__`` (KVzip, Finch, ...), not just hooks."""
    if press is None:
        return False
    call = getattr(type(press), "__call__", None)  # noqa: B004 - the function itself is compared below
    return not getattr(press, "uses_apply_press", False) and call not in _HOOKABLE_CALLS


def positions_follow_cache(press) -> bool:
    """kvpress presses that re-rotate kept keys to 0..n-1: the next position is the cache length."""
    if isinstance(press, KeyRerotationPress):
        return True
    if isinstance(press, FinchPress):
        return bool(press.rerotate_keys)
    return type(press).__name__ == "RestoreKVPress"


def _press_hook(press, adapter, model):
    def hook(module, args, kwargs, output):
        view = adapter.press_view(model, module)
        try:
            return press.forward_hook(view, list(args), adapter.hook_kwargs(module, args, kwargs), output)
        except AssertionError as exc:  # kvpress checks its inputs with asserts: say which press and what to change
            from kvpress_ext.registry import press_name

            name = press_name(press)
            raise PressInputError(
                f"{name} cannot compress this input: {str(exc).strip() or 'assertion failed'}. Change its "
                f"parameters (see `kvpress-ext describe {name}`) or give it a longer input."
            ) from exc

    return hook


def manages_whole_cache(press) -> bool:
    """Presses with ``after_forward(cache)``: called once per forward pass, after every layer has attended.

    For a press whose decision does not depend on the layer's attention inputs (StreamingLLM-style
    eviction by position), compacting every layer after the forward equals compacting each layer right
    after its own attention (no layer reads another layer's cache), and it costs one Python hook per
    forward instead of one per layer: the per-token overhead that matters when decoding small models.
    The press works on the real cache tensors (natural basis, partial rotary on GPT-NeoX) through the adapter.
    """
    return callable(getattr(press, "after_forward", None))


def _after_forward_hook(press):
    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if cache is None:  # the model made its own cache
            cache = getattr(output, "past_key_values", None)
        if cache is not None:
            press.after_forward(cache)
        return output

    return hook


def _cache_length_hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if cache is not None:
        set_next_position(cache, cache.get_seq_length())


@contextmanager
def apply_press(press, model, *, track=True):
    """Context manager: ``press`` compresses the KV cache of every forward pass of ``model`` inside it.

    ``press=None`` only tracks positions. ``track=False`` skips position tracking (for callers that
    manage positions themselves, e.g. a reference implementation).
    """
    adapter = get_adapter(model)
    decoder = adapter.decoder(model)
    with ExitStack() as stack:
        if track:
            stack.enter_context(track_positions(decoder))
        if press is None:
            yield
            return
        if drives_model(press):
            if not isinstance(adapter, LlamaFamilyAdapter):
                raise UnsupportedModelError(
                    f"{type(press).__name__} runs the model itself (not only attention hooks) and supports "
                    f"Llama-family models only, not {adapter.name}. Pick a hook-based press (e.g. knorm, snapkv)."
                )
            stack.enter_context(press(model))
        elif manages_whole_cache(press):
            press.post_init_from_model(model)
            handle = decoder.register_forward_hook(_after_forward_hook(press), with_kwargs=True)
            stack.callback(handle.remove)
            if hasattr(press, "reset"):
                stack.callback(press.reset)
        else:
            press.post_init_from_model(model)
            hook = _press_hook(press, adapter, model)
            for module in adapter.attention_modules(model):
                handle = module.register_forward_hook(hook, with_kwargs=True)
                stack.callback(handle.remove)
            for resettable in (press, getattr(press, "decoding_press", None)):
                if hasattr(resettable, "reset"):
                    stack.callback(resettable.reset)
        if positions_follow_cache(press):
            handle = decoder.register_forward_hook(_cache_length_hook, with_kwargs=True)
            stack.callback(handle.remove)
        yield
