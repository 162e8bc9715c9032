"""``kvpress-ext generate`` against references computed directly in Python (``model.generate``, a plain loop)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import shared_path
from transformers import DynamicCache, TextStreamer

from kvpress_ext.cli import main
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.positions import cache_length
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.runtime.pipeline import greedy_decode

PROMPT = "Once upon a time, there was a little girl named Lily. She"
SHORT_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model_dir():
    return str(shared_path("models", "stories260k"))


@pytest.fixture(scope="module")
def long_prompt():
    """About 300 tokens of TinyStories: far more than the 64-token cap used below."""
    return shared_path("data", "tinystories_val.txt").read_text(encoding="utf-8")[:1200]


def run_cli(model_dir, tmp_path, *args, prompt=PROMPT, name="out.json") -> dict:
    out = tmp_path / name
    rc = main(["generate", "--model", model_dir, "--prompt", prompt, "--no_progress", "--json", str(out), *args])
    assert rc == 0
    return json.loads(out.read_text())


def reference_loop(model, input_ids, press, max_new_tokens, chunk=None):
    """Greedy decoding written out directly (one apply_press for both phases, no EOS stop): the ids and the
    cache length after every forward pass."""
    cache = DynamicCache()
    lengths = []
    step = chunk or input_ids.shape[1]
    with torch.no_grad(), apply_press(press, model):
        for start in range(0, input_ids.shape[1], step):
            out = model(input_ids=input_ids[:, start : start + step], past_key_values=cache)
            lengths.append(cache_length(cache))
        ids = [int(out.logits[0, -1].argmax())]
        while len(ids) < max_new_tokens:
            out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache)
            lengths.append(cache_length(cache))
            ids.append(int(out.logits[0, -1].argmax()))
    return ids, lengths


@pytest.mark.slow
def test_greedy_without_press_equals_model_generate(stories260k, model_dir, tmp_path):
    model, tok = stories260k
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "120")
    input_ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(input_ids, max_new_tokens=120, do_sample=False)[0, input_ids.shape[1] :].tolist()
    assert record["generated_ids"] == ref
    assert record["text"] == tok.decode(ref, skip_special_tokens=True)
    assert record["stopped_at_eos"] == (ref[-1] == model.generation_config.eos_token_id)


@pytest.mark.slow
def test_no_stop_at_eos_equals_direct_loop(stories260k, model_dir, tmp_path):
    model, tok = stories260k
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "300", "--no_stop_at_eos")
    input_ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref, lengths = reference_loop(model, input_ids, None, 300)
    assert record["generated_ids"] == ref
    assert record["cache_len_final"] == record["cache_len_peak"] == lengths[-1] == input_ids.shape[1] + 299


@pytest.mark.slow
def test_stop_at_eos(stories260k, tmp_path):
    """stories260k's greedy stories never emit EOS, so a copy of it names a token it does emit as EOS:
    generation stops after its first occurrence (included), as model.generate does, unless --no_stop_at_eos."""
    model, tok = stories260k
    input_ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    plain, _ = reference_loop(model, input_ids, None, 100)
    eos = plain[40]
    model_copy = copy.deepcopy(model)
    model_copy.generation_config.eos_token_id = eos
    model_copy.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        ref = model_copy.generate(input_ids, max_new_tokens=100, do_sample=False)[0, input_ids.shape[1] :].tolist()
    assert ref == plain[: plain.index(eos) + 1]
    stopped = run_cli(str(tmp_path / "model"), tmp_path, "--max_new_tokens", "100", name="stop.json")
    assert stopped["generated_ids"] == ref and stopped["stopped_at_eos"]
    full = run_cli(str(tmp_path / "model"), tmp_path, "--max_new_tokens", "100", "--no_stop_at_eos", name="full.json")
    assert full["generated_ids"] == plain and not full["stopped_at_eos"]


@pytest.mark.slow
def test_knorm_ratio_zero_equals_no_press(model_dir, tmp_path):
    plain = run_cli(model_dir, tmp_path, "--max_new_tokens", "80", name="plain.json")
    knorm = run_cli(model_dir, tmp_path, "--max_new_tokens", "80", "--press", "knorm",
                    "--press_kwargs", "compression_ratio=0.0", name="knorm.json")
    assert knorm["generated_ids"] == plain["generated_ids"]
    assert knorm["press"] == "knorm" and knorm["press_params"] == {"compression_ratio": 0.0}


@pytest.mark.slow
def test_prefill_only_press_compresses_the_prompt_only(stories260k, model_dir, tmp_path, long_prompt):
    """knorm compresses at prefill (the prompt is the context) and lets the decoded tokens accumulate."""
    _, tok = stories260k
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "40", "--no_stop_at_eos", "--press", "knorm",
                     "--press_kwargs", "compression_ratio=0.5", prompt=long_prompt)
    n = len(tok(long_prompt)["input_ids"])
    assert record["prompt_tokens"] == n
    assert record["cache_len_final"] == int(n * 0.5) + 39


@pytest.mark.slow
def test_lazy_streaming_bounded_and_equal_to_direct_loop(stories260k, model_dir, tmp_path):
    model, tok = stories260k
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "200", "--no_stop_at_eos", "--press",
                     "lazy_streaming", "--press_kwargs", "cap_total=64", "slack=16", prompt=SHORT_PROMPT)
    input_ids = tok(SHORT_PROMPT, return_tensors="pt")["input_ids"]
    assert input_ids.shape[1] <= 16  # one prefill chunk, so greedy_decode's single prefill forward is the same
    with torch.no_grad(), apply_press(LazyStreamingPress(cap_total=64, slack=16), model):
        ref = greedy_decode(model, input_ids, DynamicCache(), 200)
    _, lengths = reference_loop(model, input_ids, LazyStreamingPress(cap_total=64, slack=16), 200)
    assert record["generated_ids"] == ref
    assert record["cache_len_peak"] == max(lengths) <= 64
    assert record["cache_len_final"] == lengths[-1]
    assert record["generated_tokens"] == 200


@pytest.mark.slow
def test_lazy_streaming_prompt_longer_than_cap(stories260k, model_dir, tmp_path, long_prompt):
    model, tok = stories260k
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "100", "--no_stop_at_eos", "--press",
                     "lazy_streaming", "--press_kwargs", "cap_total=64", "slack=16", prompt=long_prompt)
    input_ids = tok(long_prompt, return_tensors="pt")["input_ids"]
    assert input_ids.shape[1] > 4 * 64
    ref, lengths = reference_loop(model, input_ids, LazyStreamingPress(cap_total=64, slack=16), 100, chunk=16)
    assert record["generated_ids"] == ref
    assert record["cache_len_peak"] == max(lengths) <= 64


@pytest.mark.slow
def test_sampling_reproducible_and_seeded(model_dir, tmp_path):
    args = ("--max_new_tokens", "60", "--no_stop_at_eos", "--temperature", "1.0", "--top_p", "0.95")
    a = run_cli(model_dir, tmp_path, *args, "--seed", "1", name="a.json")
    b = run_cli(model_dir, tmp_path, *args, "--seed", "1", name="b.json")
    c = run_cli(model_dir, tmp_path, *args, "--seed", "2", name="c.json")
    assert a["generated_ids"] == b["generated_ids"]
    assert a["generated_ids"] != c["generated_ids"]
    # a nucleus that holds only the most likely token is greedy decoding
    tiny = run_cli(model_dir, tmp_path, "--max_new_tokens", "60", "--no_stop_at_eos", "--temperature", "1.0",
                   "--top_p", "1e-6", name="tiny.json")
    greedy = run_cli(model_dir, tmp_path, "--max_new_tokens", "60", "--no_stop_at_eos", name="greedy.json")
    assert tiny["generated_ids"] == greedy["generated_ids"]


@pytest.mark.slow
def test_stream_prints_the_final_text(model_dir, tmp_path, capsys):
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "250", "--no_stop_at_eos", "--stream")
    out, err = capsys.readouterr()
    assert out == record["text"] + "\n"
    assert "generated 250 tok" in err and "peak" in err


def test_streamed_text_keeps_multibyte_characters(stories260k):
    """Byte-fallback pieces of one character arrive as several tokens; nothing half-decoded is printed."""
    _, tok = stories260k
    text = "Lily saw a 🐶 and said “héllo” ünd ∑ — then she smiled."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(tok.decode([i]) for i in ids) != text  # token by token would break characters and spaces
    pieces = []
    streamer = TextStreamer(tok, skip_special_tokens=True)  # what `generate --stream` prints with
    streamer.on_finalized_text = lambda text, stream_end=False: pieces.append(text)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_json_fields(stories260k, model_dir, tmp_path):
    _, tok = stories260k
    record = run_cli(model_dir, tmp_path, "--max_new_tokens", "30", "--no_stop_at_eos")
    expected = {"model", "press", "press_params", "device", "prompt", "text", "generated_ids", "prompt_tokens",
                "generated_tokens", "ttft_s", "decode_s", "decode_tok_per_s", "cache_len_final", "cache_len_peak",
                "stopped_at_eos", "max_new_tokens", "temperature", "top_p", "seed", "peak_memory_bytes",
                "peak_memory_kind"}
    assert expected <= set(record)
    assert record["press"] is None and record["prompt"] == PROMPT
    assert record["prompt_tokens"] == len(tok(PROMPT)["input_ids"])
    assert record["generated_tokens"] == len(record["generated_ids"]) == 30
    assert record["ttft_s"] > 0 and record["decode_tok_per_s"] > 0 and record["peak_memory_bytes"] > 0


@pytest.mark.parametrize("args, message", [
    (["--press", "knrom"], "Did you mean: knorm"),
    (["--press", "knorm", "--press_kwargs", "ratio=0.5"], "Its parameters are: compression_ratio"),
    (["--press", "knorm", "--press_kwargs", "compression_ratio=1.5"], "[0, 1)"),
    (["--press", "knorm", "--press_kwargs", "compression_ratio"], "KEY=VALUE"),
    (["--press_kwargs", "compression_ratio=0.5"], "needs --press NAME"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be a positive integer"),
])
def test_bad_arguments_exit_2(model_dir, args, message, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", PROMPT, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_model_and_empty_prompt_exit_2(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "no_model"), "--prompt", PROMPT]) == 2
    assert "does not exist: pass --model a local model directory" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--prompt", "  \n"]) == 2
    assert "The prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--prompt_file", str(tmp_path / "missing.txt")]) == 2
    assert "--prompt_file" in capsys.readouterr().err


@pytest.mark.slow
def test_default_ratio_warnings_and_threads_on_the_command_line(model_dir, tmp_path, capsys):
    """`--press snapkv` alone removes half the cache (the one default ratio); a short prompt it cannot compress, or
    a ratio of 0, gives one warning line each (not a traceback, not one per layer); the statistics line names
    the thread count."""
    record = run_cli(model_dir, tmp_path, "--press", "snapkv", "--max_new_tokens", "3", prompt=SHORT_PROMPT)
    err = capsys.readouterr().err
    assert record["press_params"]["compression_ratio"] == 0.5 and record["threads"] == 1
    warnings_ = [line for line in err.splitlines() if line.startswith("kvpress-ext: warning:")]
    assert len(warnings_) == 1 and "snapkv did not compress a 5-token input" in warnings_[0], err
    assert "on 1 CPU thread |" in err and "loadavg_1m" in record["load_start"]
    run_cli(model_dir, tmp_path, "--press", "knorm", "--press_kwargs", "compression_ratio=0", "--max_new_tokens", "3",
            "--threads", "2", name="zero.json")
    err = capsys.readouterr().err
    warnings_ = [line for line in err.splitlines() if line.startswith("kvpress-ext: warning:")]
    assert len(warnings_) == 1 and "knorm is configured to compress nothing (compression_ratio=0)" in warnings_[0]
    assert "on 2 CPU threads |" in err
    torch.set_num_threads(1)
