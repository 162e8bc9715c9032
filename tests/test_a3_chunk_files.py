"""A³ chunk files (storage/chunk_files.py): how a .txt is cut into slices of tokens, which JSON/JSONL chunk
lists are accepted, and the one-line message of every file that is refused."""

from __future__ import annotations

import json
import re

import pytest

from kvpress_ext.storage.chunk_files import A3InputError, load_chunks, read_chunk_texts, split_tokens
from kvpress_ext.testing import tiny_tokenizer


def test_token_lists_are_split_into_slices_of_at_most_n():
    assert split_tokens(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_tokens([7, 8], 5) == [[7, 8]] and split_tokens([], 3) == []
    assert split_tokens(list(range(6)), 1) == [[i] for i in range(6)]


def test_txt_is_cut_into_slices_and_json_chunks_are_kept_whole(tmp_path, caplog):
    tok = tiny_tokenizer()
    tok.model_max_length = 600  # the .txt below is longer: it is split into slices, so the tokenizer must not warn
    txt = tmp_path / "c.TXT"
    txt.write_text("abcdefghij")
    assert load_chunks(txt, tok, chunk_tokens=4) == [[69, 70, 71, 72], [73, 74, 75, 76], [77, 78]]
    long = tmp_path / "long.txt"
    long.write_text("x" * 1100)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # conftest silences transformers; a user's session shows its warnings
    try:
        assert [len(c) for c in load_chunks(long, tok)] == [512, 512, 76]  # the default slice length
        assert "longer than the specified maximum" not in caplog.text  # a long .txt is cut below: no warning
        tok("x" * 700)  # the check can fail: the tokenizer does warn about one sequence that long
        assert "longer than the specified maximum" in caplog.text
    finally:
        hf_logging.set_verbosity(level)
    js = tmp_path / "c.json"
    js.write_text(json.dumps(["ab", {"text": "c", "id": 3}]))
    assert read_chunk_texts(js) == ["ab", "c"] and load_chunks(js, tok) == [[69, 70], [71]]
    jl = tmp_path / "c.jsonl"
    jl.write_text('"ab"\n{"text": "c"}\n')
    assert load_chunks(jl, tok, chunk_tokens=1) == [[69, 70], [71]]  # JSON chunks are never cut


@pytest.mark.parametrize("content,message", [
    ("[1, 2", r"^{p} is not JSON/JSONL \(.*\); use a JSON list of strings, JSONL, or a \.txt file$"),
    ('["a", 3]', r'^{p}: chunk 1 is neither a string nor an object with a "text" string; fix it$'),
    ('[{"txt": "a"}]', r'^{p}: chunk 0 is neither a string nor an object with a "text" string; fix it$'),
    ('[{"text": 5}]', r'^{p}: chunk 0 is neither'),
    ("[]", r"^{p} holds no chunks; add at least one chunk string$"),
    ('["a", ""]', r"^{p}: chunk 1 has no tokens; remove empty chunks$"),
])
def test_malformed_chunk_lists_are_refused_with_the_fix(tmp_path, content, message):
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(A3InputError, match=message.format(p=re.escape(str(p)))):
        load_chunks(p, tiny_tokenizer())


def test_missing_and_empty_chunk_files(tmp_path):
    with pytest.raises(A3InputError, match=r"^chunk file not found: .*none\.txt; pass --chunks with a \.txt, \.json "
                                           r"or \.jsonl file$"):
        load_chunks(tmp_path / "none.txt", tiny_tokenizer())
    with pytest.raises(A3InputError, match="chunk file not found"):
        load_chunks(tmp_path, tiny_tokenizer())  # a directory
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(A3InputError, match=r"e\.txt: the file has no tokens; remove empty chunks$"):
        load_chunks(empty, tiny_tokenizer())


def test_unreadable_or_non_utf8_chunk_files(tmp_path, monkeypatch):
    from pathlib import Path

    from kvpress_ext.storage.inputs import InputFileError

    latin = tmp_path / "latin.json"
    latin.write_bytes(b'["caf\xe9"]')
    with pytest.raises(InputFileError, match=r"^--chunks '.*latin\.json' is not valid UTF-8 \(byte 0xe9 on line 1"):
        read_chunk_texts(latin)
    locked = tmp_path / "locked.txt"
    locked.write_text("abc")
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self == locked else real(self))
    with pytest.raises(InputFileError, match=r"^--chunks '.*locked\.txt' cannot be read \(Permission denied\); pass a "
                                             r"UTF-8 \.txt, \.json or \.jsonl chunk file\.$"):
        load_chunks(locked, tiny_tokenizer())
