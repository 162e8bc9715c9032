"""Chunk files for A³: the chunks of a JSON list / JSONL file of strings or ``{"text": ...}`` objects, or of a
``.txt`` file cut into fixed token slices (concatenated, the slices are the text's tokens, so fusion and a full
prefill see the same sequence)."""

from __future__ import annotations

import json
from pathlib import Path

from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.storage.inputs import parse_json_or_jsonl, read_text_file

CHUNK_FILE = "a UTF-8 .txt, .json or .jsonl chunk file"


class A3InputError(KVPressExtError):
    """Bad ``kvpress-ext a3`` input: a missing file or store, chunks not precomputed, a malformed option."""


def split_tokens(ids: list[int], chunk_tokens: int) -> list[list[int]]:
    """Consecutive slices of ``chunk_tokens`` ids (the last one shorter); concatenated they are ``ids``."""
    return [list(ids[i : i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]


def check_chunk_file(path) -> Path:
    """``path`` if it is an existing UTF-8 file (checked before any model is loaded), else a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise A3InputError(f"chunk file not found: {path}; pass --chunks with a .txt, .json or .jsonl file")
    read_text_file(path, "--chunks", CHUNK_FILE)
    return path


def read_chunk_texts(path) -> list[str]:
    """The chunk strings of a JSON list / JSONL file of strings or ``{"text": ...}`` objects."""
    path = check_chunk_file(path)
    try:
        items = parse_json_or_jsonl(read_text_file(path, "--chunks", CHUNK_FILE))
    except json.JSONDecodeError as e:
        raise A3InputError(f"{path} is not JSON/JSONL ({e}); use a JSON list of strings, JSONL, or a .txt file") from None
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise A3InputError(f"{path}: chunk {i} is neither a string nor an object with a \"text\" string; fix it")
        texts.append(item)
    if not texts:
        raise A3InputError(f"{path} holds no chunks; add at least one chunk string")
    return texts


def load_chunks(path, tokenizer, chunk_tokens: int = 512) -> list[list[int]]:
    """Token ids of every chunk of a chunk file (see the module docstring), encoded without special tokens."""
    path = check_chunk_file(path)
    if path.suffix.lower() == ".txt":
        text = read_text_file(path, "--chunks", CHUNK_FILE)
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # split below
        chunks = split_tokens(ids, chunk_tokens)
    else:
        chunks = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in read_chunk_texts(path)]
    empty = [i for i, c in enumerate(chunks) if not c]
    if not chunks or empty:
        where = f"chunk {empty[0]} has" if empty else "the file has"
        raise A3InputError(f"{path}: {where} no tokens; remove empty chunks")
    return chunks
