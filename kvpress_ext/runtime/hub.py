"""Is the Hugging Face hub usable? Decided once per process, in about a second, so that offline a hub model id, a
press that downloads files (``qfilter``, ``kvzap``, ...) or a hub dataset fails at once with one line naming the
fix, instead of after 30-80 s of retries.

``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are honoured; otherwise one TCP connect to the hub endpoint (port
443, :data:`CONNECT_TIMEOUT_S`) decides. When the hub is unreachable, :func:`use_cache_only_if_offline` switches
huggingface_hub (and so transformers and datasets) to offline mode for the rest of the process: files already in
the local cache are still used, anything else fails immediately.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from urllib.parse import urlparse

from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.registry import press_info

CONNECT_TIMEOUT_S = 1.5
_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class HubUnavailableError(KVPressExtError):
    """Something needs the Hugging Face hub, which is offline, and it is not in the local cache."""


class PressUnavailableError(KVPressExtError):
    """A press that needs something it could not get here (hub files, a supported checkpoint, a delimiter token)."""


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def offline_reason() -> str | None:
    """Why the hub cannot be used (``"HF_HUB_OFFLINE=1 is set"``, ``"huggingface.co:443 cannot be reached (...)"``),
    or None when it can. Checked once per process."""
    for variable in _OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in _TRUE:
            return f"{variable}={os.environ[variable]} is set"
    host, port = _endpoint()
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        detail = exc.strerror or str(exc) or type(exc).__name__
        return f"{host}:{port} cannot be reached ({detail})"
    return None


def hub_reachable() -> bool:
    """True when the hub can be used (see :func:`offline_reason`)."""
    return offline_reason() is None


def use_cache_only_if_offline() -> str | None:
    """If the hub is unusable, put huggingface_hub (transformers, datasets) in offline mode for this process, so
    cached files are used and missing ones fail at once; returns the reason, or None when online."""
    reason = offline_reason()
    if reason is not None:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            import datasets.config
        except ImportError:
            pass
        else:
            datasets.config.HF_HUB_OFFLINE = True
    return reason


def cache_dir() -> str:
    import huggingface_hub.constants

    return str(huggingface_hub.constants.HF_HUB_CACHE)


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of the hub repository ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def offline_model_error(name: str, reason: str, alternatives: str) -> HubUnavailableError:
    """The one line for a hub model id that is neither a local directory nor cached, while the hub is unusable."""
    return HubUnavailableError(
        f"Cannot load model {name!r}: it is not a local directory, the Hugging Face hub cannot be used ({reason}) "
        f"and it is not in the local cache ({cache_dir()}). Pass --model {alternatives}, or download it once "
        f"while online (`hf download {name}`)."
    )


def check_model_source(source: str, name: str, alternatives: str) -> None:
    """Before ``from_pretrained(source)``: a hub id offline must be cached (offline mode is switched on so the cache
    is used without retries); otherwise raise :class:`HubUnavailableError` at once. Local directories pass."""
    if os.path.isdir(source):
        return
    reason = use_cache_only_if_offline()
    if reason is not None and not is_cached(source):
        raise offline_model_error(name, reason, alternatives)


def press_unavailable(name: str, requires: str, exc: BaseException) -> PressUnavailableError:
    """The one line for a press that needs something it could not get (hub files, a supported checkpoint, ...)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    reason = offline_reason() if "hub" in requires and _is_hub_error(exc) else None
    offline = (f" and the Hugging Face hub cannot be used ({reason}): run it once online to fill the cache, or"
               if reason else ":")
    return PressUnavailableError(
        f"Press {name!r} cannot run here: it needs {requires}{offline} choose another press "
        f"(`kvpress-ext list` marks such presses with [needs: ...]). Cause: {type(exc).__name__}: {first}"
    )


_HUB_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError",
               "ConnectTimeout", "HfHubHTTPError", "RepositoryNotFoundError", "EntryNotFoundError")


def _is_hub_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it came from) is about reaching the hub or its cache."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if type(exc).__name__ in _HUB_ERRORS or "huggingface.co" in text or "cached files" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def explain_press_failures(name: str | None):
    """Around running the press registered as ``name``: if it declares a requirement (``requires`` in the registry,
    e.g. hub files), offline mode is switched on when the hub is unusable (no retries), and any failure inside
    becomes one :class:`PressUnavailableError` line naming the requirement and the fix. Other presses: no-op."""
    requires = None
    if name:
        with contextlib.suppress(KVPressExtError):
            requires = press_info(name).requires
    if not requires:
        yield
        return
    if "hub" in requires:
        use_cache_only_if_offline()
    try:
        yield
    except KVPressExtError:
        raise
    except Exception as exc:  # kvpress raises anything, from AssertionError to LocalEntryNotFoundError
        raise press_unavailable(name, requires, exc) from exc
