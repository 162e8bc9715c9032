"""Loading a model and its tokenizer: the one place every entry point goes through for ``--model``.

``resolve_model`` turns what a user typed into something ``from_pretrained`` accepts: a registered short name
(``smollm2-135m``, ``stories260k``, or one a plugin adds through ``kvpress_ext_register_models``) becomes a local
directory; an existing directory or a hub id passes through unchanged. ``load_model`` loads model and tokenizer
quietly (no progress bars), in eval mode, on the requested device, and checks that an adapter drives the model,
so a bad ``--model`` is one line naming the fix.

A short name wins over a same-named directory in the working directory; write ``./name`` for the directory.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpress_ext.core import tables
from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.errors import KVPressExtError, UnsupportedModelError
from kvpress_ext.runtime import hub

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}

#: The model every command uses when ``--model`` is omitted.
DEFAULT_MODEL = "smollm2-135m"


#: What ``--model`` may be instead of an uncached hub id, for error messages.
MODEL_ALTERNATIVES = "a local model directory (e.g. ../shared/models/stories260k)"


class ModelLoadError(KVPressExtError):
    """A ``--model`` that cannot be loaded: a missing directory, an unknown hub id, no tokenizer, a missing package."""


# --- the short-name registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """A short model name and what ``kvpress-ext list`` says about it; ``resolve()`` returns a local directory."""

    name: str
    resolve: Callable[[], str]
    parameters: str = ""
    context: int | None = None
    source: str = ""
    licence: str = ""
    summary: str = ""
    #: Optional: a one-line state ("ready", "converted on first use", "needs pip install ...") without loading.
    status: Callable[[], str] | None = None
    plugin: str = "kvpress_ext"


_MODELS = tables.Table("model", describe=lambda info: info.source)


def register_model(name: str, resolve: Callable[[], str], *, parameters: str = "", context: int | None = None,
                   source: str = "", licence: str = "", summary: str = "", status: Callable[[], str] | None = None,
                   plugin: str | None = None, override: bool = False) -> ModelInfo:
    """Register ``name`` (lowercase, no ``/``) so every ``--model`` accepts it.

    The collision rule of :mod:`kvpress_ext.core.tables` applies: a name another origin (built-in or plugin)
    holds is refused unless ``override=True``. ``plugin`` names the origin (default: the plugin being loaded, else
    the calling package)."""
    if not name or name != name.lower() or "/" in name or os.sep in name or name.startswith((".", "~")):
        raise ModelLoadError(f"Model short name {name!r} is invalid: use lowercase letters, digits, '-', '_' or '.'.")
    if not callable(resolve):
        raise ModelLoadError(f"register_model({name!r}) needs a callable that returns a model directory.")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or not 0 < context <= 1 << 24):
        raise ModelLoadError(f"register_model({name!r}): context={context!r} must be a whole number of tokens in "
                             f"[1, {1 << 24}] or None.")
    texts = {"parameters": parameters, "source": source, "licence": licence, "summary": summary}
    bad = [k for k, v in texts.items() if not isinstance(v, str)]
    if bad:
        raise ModelLoadError(f"register_model({name!r}): {', '.join(bad)} must be text; pass strings.")
    origin = tables.resolve_origin(plugin, tables.caller_module())
    info = ModelInfo(name, resolve, parameters, context, source, licence, summary, status, origin)
    _MODELS.add(name, info, origin=origin, override=override)
    return info


def available_models() -> dict[str, ModelInfo]:
    """Every registered short name (sorted), built-ins and plugins'."""
    tables.ensure_loaded()
    return dict(sorted((entry.key, entry.value) for entry in _MODELS.entries()))


def model_status(info: ModelInfo) -> str:
    if info.status is None:
        return ""
    try:
        return info.status()
    except Exception as exc:  # noqa: BLE001 - a listing must not fail on one entry
        return f"unavailable ({type(exc).__name__}: {exc})"


def looks_like_path(name_or_path: str) -> bool:
    """True for what can only be a filesystem path (``./m``, ``/m``, ``~/m``, ``a/b/c``), not a hub id (``org/name``)."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path


def resolve_model(name_or_path: str | os.PathLike | None = None) -> str:
    """What ``from_pretrained`` should load for ``name_or_path`` (default :data:`DEFAULT_MODEL`): a registered short
    name's local directory (converted or located on first use), an existing local directory, or a hub id."""
    name_or_path = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    if not name_or_path.strip():  # "" would be the current folder
        raise ModelLoadError(f"--model is empty: pass a short name ({', '.join(available_models())}), a local model "
                             "directory or a hub id.")
    if not looks_like_path(name_or_path):
        models = available_models()
        if name_or_path in models:
            return str(models[name_or_path].resolve())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if looks_like_path(name_or_path):
        raise ModelLoadError(
            f"Model directory {name_or_path!r} does not exist: pass --model a local model directory, a hub id "
            f"or a short name ({', '.join(available_models())})."
        )
    if "/" not in name_or_path:  # not a hub id either: most likely a mistyped short name
        close = difflib.get_close_matches(name_or_path, list(available_models()), n=3, cutoff=0.5)
        if close:
            raise ModelLoadError(f"Unknown model {name_or_path!r}. Did you mean: {', '.join(close)}? "
                                 "Run `kvpress-ext list` for the short names.")
    return name_or_path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_model(name_or_path: str | os.PathLike | None = None, *, device: str | None = None, dtype: str = "auto",
               attn_implementation: str | None = None, check_supported: bool = True,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None):
    """(model, tokenizer) for ``name_or_path`` (a short name, directory or hub id; default :data:`DEFAULT_MODEL`) in
    eval mode on ``device`` (default: cuda if available, else cpu).

    ``device_map`` (``auto``, ``balanced``, ``sequential``, a device, or ``{module name: device | "cpu" |
    "disk"}``), ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}``; implies ``device_map="auto"``) and
    ``offload_folder`` go to ``from_pretrained``: accelerate then splits the model over devices, CPU and disk
    and moves weights per layer; ``device`` is not used then.

    Raises :class:`ModelLoadError` (one line) when it cannot be loaded and :class:`UnsupportedModelError` when no
    adapter drives the model (``check_supported``).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    source = resolve_model(name_or_path)
    # a hub id offline: the cache only, at once; not cached: one line naming the fix (not 70 s of retries)
    hub.check_model_source(source, name_or_path, MODEL_ALTERNATIVES)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if max_memory and device_map is None:
        device_map = "auto"
    if device_map is not None:
        if device is not None:
            raise ModelLoadError("--device and --device_map exclude each other: pass one of them.")
        if max_memory:  # GPU indices may arrive as strings (JSON, command line)
            max_memory = {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
        kwargs.update(device_map=device_map, max_memory=max_memory or None, offload_folder=offload_folder)
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model = (model if device_map is not None else model.to(device)).eval()
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"Cannot load model {name_or_path or DEFAULT_MODEL!r}: {_first_line(exc)}") from exc
    if check_supported:
        try:
            get_adapter(model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(str(exc).split(". To add")[0] + ".") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load a tokenizer for {name_or_path!r}: {_first_line(exc)}") from exc
    return model, tokenizer


def check_device(device: str) -> None:
    """A ``--device`` this torch can use, or :class:`ModelLoadError` naming one it can (not an assertion deep in
    torch: a CUDA device on a CPU-only build, a GPU index that does not exist, a misspelt device)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ModelLoadError(f"--device {device!r} is not a device ({first}); use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no usable GPU"
            raise ModelLoadError(f"--device {device} needs a GPU, but this torch {torch.__version__} {why}; "
                                 "use --device cpu (or leave --device out).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: there are {torch.cuda.device_count()} GPU(s); use "
                                 f"cuda:0 ... cuda:{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"--device {device}: kvpress_ext runs on cpu, cuda or mps; use one of those.")


# --- the attention kernel a press accepts --------------------------------------------------------------------
def other_attention(model, exc: BaseException) -> str | None:
    """The kernel to use instead when ``exc`` is a press refusing the model's attention kernel (kvpress presses
    assert on it: some need eager attention weights, others refuse them), else None."""
    text = str(exc).lower()
    if not isinstance(exc, AssertionError) or ("attention" not in text and "eager" not in text):
        return None
    return "sdpa" if model.config._attn_implementation == "eager" else "eager"


@dataclass(frozen=True)
class AttentionRetry:
    """``fn`` ran with ``kernel`` after the press refused the model's own (``reason``: its assertion)."""

    kernel: str
    reason: str


def retry_with_other_attention(model, fn: Callable[[], object]) -> tuple[object, AttentionRetry | None]:
    """``(fn(), None)``; when a press refuses the model's kernel (eager or sdpa), ``fn()`` once more with the other
    one (the model's kernel is restored afterwards) and what was retried."""
    current = model.config._attn_implementation
    try:
        return fn(), None
    except AssertionError as exc:
        other = other_attention(model, exc)
        if other is None or current not in ("eager", "sdpa"):
            raise
        model.set_attn_implementation(other)
        try:
            return fn(), AttentionRetry(other, str(exc))
        finally:
            model.set_attn_implementation(current)
