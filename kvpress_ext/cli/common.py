"""Argument parsing shared by the commands: ``--model``, ``KEY=VALUE`` press parameters, positive integers,
``--threads``, where a model's layers go (``--device_map``, ``--max_memory``, ``--offload_folder``), sweep executor
flags, and warnings printed as one line."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import signal
import sys
import warnings

from kvpress_ext.core.apply import quiet_repeated_kvpress_logs
from kvpress_ext.core.errors import KVPressExtError, PressParameterError
from kvpress_ext.evaluation.sweep import EXECUTORS, SweepOptions
from kvpress_ext.runtime.models import DEFAULT_MODEL
from kvpress_ext.runtime.threads import DEFAULT_THREADS, set_threads  # noqa: F401 - re-exported for the commands
from kvpress_ext.storage.inputs import load_json, read_text_file


def parse_value(text: str):
    """``true``/``false`` -> bool, ``none``/``null`` -> None, then int, then float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_press_kwargs(items: list[str] | None, flag: str = "--press_kwargs") -> dict:
    """``["k=v", ...]`` -> ``{k: parse_value(v)}``; a malformed item is a one-line error naming ``flag``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PressParameterError(f"{flag} expects KEY=VALUE items, got {item!r}.")
        out[key] = parse_value(value)
    return out


def _checked(text: str, cast, what: str, ok, rule: str):
    """``cast(text)`` for an argparse type, else one line: ``expected <what>`` when it does not parse, ``<rule>``
    when ``ok(value)`` is false (NaN fails every range)."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _checked(text, int, "a positive integer", lambda v: v >= 1, "expected a positive integer")


def seed_int(text: str) -> int:
    """argparse type: a seed torch accepts, 0 <= seed < 2**63."""
    return _checked(text, int, "a whole number", lambda v: 0 <= v < 1 << 63, "a seed must be in [0, 2**63)")


def temperature(text: str) -> float:
    """argparse type: a sampling temperature, 0 (greedy) or a finite number in [0.001, 1000]."""
    return _checked(text, float, "a number", lambda v: v == 0 or 1e-3 <= v <= 1e3,
                    "must be 0 (greedy) or in [0.001, 1000]")


def probability_mass(text: str) -> float:
    """argparse type: a nucleus sampling mass in (0, 1]."""
    return _checked(text, float, "a number", lambda v: 0 < v <= 1, "must be in (0, 1]")


def token_offset(text: str) -> int:
    """argparse type: a whole number of positions, at most 2**24 either way."""
    return _checked(text, int, "a whole number", lambda v: abs(v) <= 1 << 24,
                    f"must be within +-{1 << 24} positions")


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`kvpress_ext.evaluation.sweep.SweepOptions` (same names), for commands that run sweeps."""
    d = SweepOptions()
    g = parser.add_argument_group("sweep execution (kvpress_ext.evaluation.sweep)")
    g.add_argument("--executor", default=d.executor, choices=EXECUTORS,
                   help='run cells in this process (local) or as Ray tasks (ray; pip install "kvpress-ext[distributed]")')
    g.add_argument("--max_retries", type=int, default=d.max_retries,
                   help="retries of a cell that raised or whose worker died, before it is recorded as failed")
    g.add_argument("--cell_gpus", type=float, default=d.cell_gpus, help="GPUs per cell (Ray num_gpus; fractions share one)")
    g.add_argument("--cell_cpus", type=float, default=d.cell_cpus, help="CPU cores per cell (Ray num_cpus)")
    g.add_argument("--ray_address", default=d.ray_address,
                   help="existing Ray cluster (e.g. ray://head:10001 or auto; default: $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--ray_num_cpus", type=positive_int, default=d.ray_num_cpus,
                   help="CPUs of the local Ray started for the sweep (default: all)")


def sweep_options_from_args(args: argparse.Namespace):
    """The parsed :func:`add_sweep_args` flags as :class:`kvpress_ext.evaluation.sweep.SweepOptions`."""
    return SweepOptions(executor=args.executor, max_retries=args.max_retries, cell_gpus=args.cell_gpus,
                        cell_cpus=args.cell_cpus, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
                        progress=not getattr(args, "no_progress", False))


def parse_device_map(text: str | None):
    """``--device_map``: ``auto`` / ``balanced`` / ``sequential`` / a device name as is; a JSON object
    (``{"model.layers.0": 0, ...}``) or a ``.json`` file holding one becomes a dict."""
    if text is None:
        return None
    raw = text
    if text.endswith(".json"):
        raw = read_text_file(text, "--device_map", "auto, a device, a JSON map or a .json file holding one")
    if raw.lstrip().startswith("{") or raw is not text:  # a .json file holds JSON, whatever its first character
        try:
            value = load_json(raw, "--device_map")
        except json.JSONDecodeError as exc:
            raise KVPressExtError(f"--device_map is not valid JSON ({exc.msg}): pass auto or a JSON map.") from None
        if not isinstance(value, dict):
            raise KVPressExtError("--device_map JSON must be an object {module name: device}.")
        return value
    return text


def parse_max_memory(items: list[str] | None) -> dict | None:
    """``["0=20GiB", "cpu=60GiB"]`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (GPU indices as ints), for accelerate."""
    if not items:
        return None
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise KVPressExtError(f"--max_memory expects DEVICE=SIZE items (e.g. 0=20GiB cpu=60GiB), got {item!r}.")
        out[int(key) if key.isdigit() else key] = value
    return out


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """``--device_map``, ``--max_memory``, ``--offload_folder``: split a model over devices with accelerate."""
    g = parser.add_argument_group("model placement (accelerate)")
    g.add_argument("--device_map", default=None,
                   help="split the model: auto, balanced, sequential, or a JSON map / .json file {module: device|cpu|disk}")
    g.add_argument("--max_memory", nargs="+", default=None, metavar="DEVICE=SIZE",
                   help="memory per device for --device_map (e.g. 0=20GiB 1=20GiB cpu=60GiB); implies --device_map auto")
    g.add_argument("--offload_folder", default=None, help="folder for weights offloaded to disk by --device_map")


def placement_kwargs(args: argparse.Namespace) -> dict:
    """The :func:`add_placement_args` flags as ``load_model`` keyword arguments."""
    return {"device_map": parse_device_map(args.device_map), "max_memory": parse_max_memory(args.max_memory),
            "offload_folder": args.offload_folder}


_SURROGATE = re.compile("[\ud800-\udfff]")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` states each option's default once: appended where the help text does not already say it, and not
    for flags (no value) or options whose default is None or empty (their help says what happens without them)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS, "", [], ())
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse under the bad-input contract: a parse error is one line on stderr naming the fix, exit status 2
    (argparse's default prints the whole usage block first). Subcommand parsers inherit the class, and with it
    :class:`DefaultsHelpFormatter`. Text that is not valid UTF-8 (Python hands such command-line bytes over as lone
    surrogates, which tokenizers reject with a ``TypeError``) is refused here, once for every option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for name, value in vars(namespace).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, str) and _SURROGATE.search(v) for v in values):
                self.error(f"--{name} holds bytes that are not valid UTF-8 text; pass it as UTF-8")
        return namespace, extras


#: What no command should show as a traceback: the last-resort handler turns each into one line and exit 2.
LAST_RESORT = (RecursionError, OverflowError, MemoryError, OSError)


def last_resort_message(exc: BaseException) -> str:
    """One line for an error no check caught, naming what to do (nothing already written is lost: every writer
    replaces files atomically)."""
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to process; pass a flatter file (nothing was changed)."
    if isinstance(exc, OverflowError):
        return f"a number is out of range ({str(exc).splitlines()[0] if str(exc) else 'overflow'}); pass a smaller value."
    if isinstance(exc, MemoryError):
        return "ran out of memory; pass a smaller input or fewer tokens (files written before are intact)."
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    why = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}; free some space, then rerun (files written before are intact)."
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {why}; pass a folder you may write into, then rerun (nothing was lost)."
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # e.g. the output folder was removed while the command ran
        return (f"no such file or directory{where} (removed while the command ran?); recreate it or pass an "
                "existing folder, then rerun (nothing was lost).")
    return f"{why}{where}; check the path still exists and is readable/writable, then rerun (nothing was lost)."


def command_entry(prog: str):
    """Decorator of a command's ``main(argv) -> int``: a :class:`KVPressExtError` or a :data:`LAST_RESORT` error
    that reaches it is printed as ``prog: error: ...`` on one line and exit status 2 (``SystemExit`` passes); a
    reader that closed the pipe early ends the command quietly with the status of a pipe-killed tool."""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                status = main(*args, **kwargs)
                sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at exit
                return status
            except BrokenPipeError:  # the reader stopped early (`kvpress-ext list | head`): quietly, as `yes | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush cannot fail
                return 128 + signal.SIGPIPE
            except KVPressExtError as exc:
                text = str(exc).strip()
                print(f"{prog}: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
            except LAST_RESORT as exc:
                print(f"{prog}: error: {last_resort_message(exc)}", file=sys.stderr)
            return 2

        return run

    return wrap


def add_threads_argument(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """``--threads N`` (and any old spellings in ``aliases``, hidden from --help)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help=f"torch CPU threads (default {DEFAULT_THREADS}: fastest on a busy machine; more can help "
                             "bigger models on an idle one)")
    for alias in aliases:
        parser.add_argument(alias, dest="threads", type=positive_int, default=None, help=argparse.SUPPRESS)


def quiet_command_line(prog: str = "kvpress-ext") -> None:
    """What every command does first: warnings as one line each, kvpress's repeated log lines once each, and no
    per-tensor "Loading weights" progress bars from transformers (whichever code path loads a model)."""
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()
    print_warnings_on_one_line(prog)
    quiet_repeated_kvpress_logs()  # kvpress logs some messages per layer and per forward: show each once


def print_warnings_on_one_line(prog: str = "kvpress-ext") -> None:
    """Show warnings as ``prog: warning: message`` on stderr (no file name, line number or source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
MODEL_HELP = ("model: a short name (smollm2-135m, stories260k, or one a plugin adds; `kvpress-ext list` shows them), "
              "a local model directory or a hub id")


def add_model_argument(parser, *, chat_template: bool = True) -> None:
    """``--model`` (default: :data:`kvpress_ext.runtime.models.DEFAULT_MODEL`) and, for commands that build prompts,
    ``--no_chat_template``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: %(default)s)")
    if chat_template:
        parser.add_argument("--no_chat_template", dest="use_chat_template", action="store_false",
                            help="feed raw text even if the model has a chat template (default: the template's "
                                 "user turn = context, blank line, question, then the assistant header)")
