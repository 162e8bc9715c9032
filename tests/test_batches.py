"""Padded batches: each sequence compressed as if it were alone, or the press refuses the batch in one line.

For every registered press that runs offline, on the tiny model of every architecture: three contexts of different
lengths (and questions of different lengths) in one left-padded batch give the same greedy tokens, and first-token
logits within 1e-4 (float32), as the three run one at a time. A press whose contract does not claim batches must
refuse with an error naming it and why.
"""

import warnings
from dataclasses import dataclass

import kvpress
import pytest
import torch
from transformers import DynamicCache, pipeline

import kvpress_ext
from kvpress_ext import apply_press, get_adapter, get_press
from kvpress_ext.core.batch import RowCache, per_row_after_forward, row_caches, row_lengths_follow_cache
from kvpress_ext.core.contract import PressContract, contract_of
from kvpress_ext.core.positions import BatchInputError, PositionState, next_position, padded_batch, position_state
from kvpress_ext.runtime.batched import end_aligned_chunks, generate_batch
from kvpress_ext.testing import ARCHITECTURES, tiny_model

TOL = 1e-4
LENGTHS = (40, 25, 33)
Q_LENGTHS = (3, 6, 4)
PRESSES = kvpress_ext.available_presses()
RUNNABLE = sorted(n for n, info in PRESSES.items()
                  if not info.requires and n != "no_press" and issubclass(info.cls, kvpress.BasePress))


def settings(name: str, model) -> dict:
    """Keyword arguments that make ``name`` compress these short contexts."""
    layers = len(get_adapter(model).layers(model))
    special = {
        "rkv": {"budget": 20, "window_size": 4, "compression_interval": 4},
        "lazy_streaming": {"cap_total": 20, "slack": 4},
        "decoding": {"compression_interval": 4, "target_size": 20},
        "cam": {"compression_interval": 4, "target_size": 20},
        "compression_ratio_decoding": {"compression_interval": 4, "target_compression_ratio": 0.5},
        "per_layer_compression": {"compression_ratios": [0.5] * layers},
        "think": {"key_channel_compression_ratio": 0.5, "window_size": 8},
        "simlayerkv": {"lazy_threshold": 0.0, "n_initial": 4, "n_recent": 8, "n_last": 1},
        "dms": {"threshold": 0.5},
        "prefill_decoding": {"prefilling_press": get_press("knorm", compression_ratio=0.5)},
    }
    if name in special:
        return special[name]
    kw = {"compression_ratio": 0.5}
    if name in ("snapkv", "pyramidkv"):
        kw["window_size"] = 8
    return kw


def build(name, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_press(name, **settings(name, model))


def claims_batches(name) -> bool:
    return contract_of(build(name, tiny_model("llama"))).batches


CLAIM = [n for n in RUNNABLE if claims_batches(n)]
REFUSE = [n for n in RUNNABLE if n not in CLAIM]


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(4, 128, (n,), generator=g).tolist() for n in LENGTHS]
    questions = [torch.randint(4, 128, (n,), generator=g).tolist() for n in Q_LENGTHS]
    return contexts, questions


def _left_padded(contexts: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of ``contexts`` left-padded (with 0) to ``width`` tokens."""
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):], mask[i, width - len(c):] = torch.tensor(c), 1
    return ids, mask


@pytest.fixture(scope="module")
def eager_models():
    return {arch: tiny_model(arch, attn_implementation="eager") for arch in ARCHITECTURES}


def _model_for(name, arch, tiny_models, eager_models):
    return eager_models[arch] if name == "observed_attention" else tiny_models[arch]  # needs attention weights


def _alone_and_batched(model, name, chunk=None):
    contexts, questions = _sequences()
    run = {"max_new_tokens": 6, "chunk_size": chunk}
    alone = [generate_batch(model, [c], build(name, model), questions=[q], **run)[0]
             for c, q in zip(contexts, questions)]
    batched = generate_batch(model, contexts, build(name, model), questions=questions, **run)
    return alone, batched


def _assert_same(alone, batched):
    for one, row in zip(alone, batched):
        assert row.generated_ids == one.generated_ids
        torch.testing.assert_close(row.first_logits, one.first_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", CLAIM)
def test_a_padded_batch_answers_as_each_sequence_alone(name, arch, tiny_models, eager_models):
    model = _model_for(name, arch, tiny_models, eager_models)
    contexts, questions = _sequences()
    if arch == "gemma3":  # sliding-window layers keep their own cache length: one slot mask cannot describe them
        with pytest.raises(BatchInputError, match=r"layers keep caches of different lengths .*batch_size=1"):
            generate_batch(model, contexts, build(name, model), questions=questions, max_new_tokens=6)
        return
    try:
        alone = [generate_batch(model, [c], build(name, model), questions=[q], max_new_tokens=6)[0]
                 for c, q in zip(contexts, questions)]
    except Exception as exc:  # noqa: BLE001 - the press's own limit on this tiny model: the batch must fail alike
        with pytest.raises(type(exc)):
            generate_batch(model, contexts, build(name, model), questions=questions, max_new_tokens=6)
        return
    _assert_same(alone, generate_batch(model, contexts, build(name, model), questions=questions, max_new_tokens=6))


@pytest.mark.parametrize("name", REFUSE)
def test_a_press_that_cannot_batch_refuses_in_one_line(name, tiny_models):
    model = tiny_models["llama"]
    contexts, questions = _sequences()
    with pytest.raises(BatchInputError, match=rf"^{name} cannot compress a padded batch \(.+\): run it one sequence "
                                              r"at a time \(batch_size=1\)") as info:
        generate_batch(model, contexts, build(name, model), questions=questions, max_new_tokens=2)
    assert "\n" not in str(info.value)


def test_the_batch_compresses_each_sequence_to_its_own_ratio(tiny_models):
    """knorm at 0.5 keeps int(n_i / 2) tokens of each sequence: the mask counts them, and no pad is among them."""
    model = tiny_models["llama"]
    contexts, _ = _sequences()
    width = max(LENGTHS)
    ids, mask = _left_padded(contexts, width)
    cache = DynamicCache()
    with torch.no_grad(), apply_press(get_press("knorm", compression_ratio=0.5), model):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    batch = padded_batch(cache)
    assert batch.lengths.tolist() == [n // 2 for n in LENGTHS]
    assert cache.get_seq_length() == max(LENGTHS) // 2
    assert [s.next_position for s in batch.rows] == list(LENGTHS)  # each sequence's own positions
    # the slots kept are the keys of the sequence's own tokens: compare with the sequence run alone
    for i, c in enumerate(contexts):
        alone = DynamicCache()
        with torch.no_grad(), apply_press(get_press("knorm", compression_ratio=0.5), model):
            model(input_ids=torch.tensor([c]), past_key_values=alone)
        n = len(c) // 2
        got = cache.layers[0].keys[i, :, -n:]
        want = alone.layers[0].keys[0]
        # the same set of keys (kvpress keeps them in score order)
        got_sorted = got.sort(dim=1).values
        torch.testing.assert_close(got_sorted, want.sort(dim=1).values, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["knorm", "snapkv", "streaming_llm", "rkv", "lazy_streaming"])
def test_chunked_prefill_in_a_batch_answers_as_each_sequence_alone(name, tiny_models):
    _assert_same(*_alone_and_batched(tiny_models["qwen2"], name, chunk=10))


def test_chunks_are_counted_from_the_end():
    assert end_aligned_chunks(10, 4) == [(0, 2), (2, 6), (6, 10)]
    assert end_aligned_chunks(8, 4) == [(0, 4), (4, 8)]
    assert end_aligned_chunks(3, 5) == [(0, 3)]


@pytest.mark.parametrize("name", ["knorm", "rkv"])
def test_model_generate_on_a_left_padded_batch_matches_each_alone(name, tiny_models):
    model = tiny_models["mistral"]
    contexts, _ = _sequences(seed=1)
    width = max(LENGTHS)
    ids, mask = _left_padded(contexts, width)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), apply_press(build(name, model), model):
        batched = model.generate(ids, attention_mask=mask, **kw)[:, width:]
    for i, c in enumerate(contexts):
        with torch.no_grad(), apply_press(build(name, model), model):
            alone = model.generate(torch.tensor([c]), **kw)[0, len(c):]
        assert batched[i].tolist() == alone.tolist()


def test_pipeline_given_a_list_answers_each_context_as_alone(tiny_models, tokenizer):
    pipe = pipeline("kv-press-text-generation", model=tiny_models["llama"], tokenizer=tokenizer, device="cpu")
    contexts = ["The cat sat on the mat and looked around the room.", "Short one.", "A context about dogs, medium."]
    kw = {"press": "knorm", "max_new_tokens": 5}
    alone = [pipe(c, question="Who?", **kw) for c in contexts]
    assert pipe(contexts, question="Who?", batch_size=3, **kw) == alone
    assert pipe(contexts, question="Who?", batch_size=2, **kw) == alone
    each = pipe(contexts, questions=["Who?", "What?", "Where?"], batch_size=3, **kw)
    assert each == [pipe(c, question=q, **kw) for c, q in zip(contexts, ["Who?", "What?", "Where?"])]


@pytest.mark.parametrize("bad, message", [
    ({"contexts": ["fine", ""]}, r"A context of the batch is empty: give every context some text\."),
    ({"questions": ["one"]}, r"Give question= \(asked of every context\) or questions= with one question per"),
    ({"batch_size": 0}, r"batch_size=0 must be a positive integer\."),
])
def test_pipeline_batch_bad_input_names_the_fix(tiny_models, tokenizer, bad, message):
    pipe = pipeline("kv-press-text-generation", model=tiny_models["llama"], tokenizer=tokenizer, device="cpu")
    bad = dict(bad)  # the parameter itself stays whole for a second run in the same process (mutmut runs twice)
    contexts = bad.pop("contexts", ["one context", "another context"])
    with pytest.raises(BatchInputError, match=message):
        pipe(contexts, question="Who?", press="knorm", **bad)


def test_empty_and_too_long_sequences_are_refused(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(BatchInputError, match=r"context 2 of the batch is empty: give every context at least one"):
        generate_batch(model, [[5, 6], []], None)
    window = model.config.max_position_embeddings
    with pytest.raises(BatchInputError, match=rf"context 1 has {window + 1} tokens, more than the model's window of "
                                              rf"{window}: shorten it"):
        generate_batch(model, [[5] * (window + 1)], get_press("knorm", compression_ratio=0.5))


@pytest.mark.parametrize("chunk", [0, 41, -1, 2.5])
def test_prefill_chunk_size_out_of_range_is_refused(tiny_models, chunk):
    contexts, _ = _sequences()
    with pytest.raises(kvpress_ext.KVPressExtError, match=rf"prefill_chunk_size={chunk!r} is invalid: give an "
                                                          r"integer from 1 to the context's length \(40 tokens\)"):
        generate_batch(tiny_models["llama"], contexts, get_press("knorm", compression_ratio=0.5), chunk_size=chunk)


def test_right_padding_is_refused(tiny_models):
    model = tiny_models["llama"]
    ids = torch.full((2, 6), 7)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with (torch.no_grad(), apply_press(get_press("knorm", compression_ratio=0.5), model),
          pytest.raises(BatchInputError, match=r"Padding must be on the left of each sequence: set "
                                               r"tokenizer.padding_side = 'left'\.")):
        model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache())


def test_generate_command_with_several_prompts_matches_each_alone(tmp_path):
    import json

    from conftest import shared_path

    from kvpress_ext.cli import main

    model_dir = str(shared_path("models", "stories260k"))
    prompts = ["Once upon a time, there was a little girl named Lily. She", "The dog ran", "Tom had a red ball and"]
    common = ["generate", "--model", model_dir, "--no_progress", "--press", "snapkv", "--press_kwargs",
              "compression_ratio=0.5", "window_size=4", "--max_new_tokens", "12", "--no_stop_at_eos"]
    out = tmp_path / "batch.json"
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main([*common, *args, "--batch_size", "3", "--json", str(out)]) == 0
    batched = json.loads(out.read_text())["generated_ids"]
    for i, prompt in enumerate(prompts):
        one = tmp_path / f"one{i}.json"
        assert main([*common, "--prompt", prompt, "--json", str(one)]) == 0
        assert batched[i] == json.loads(one.read_text())["generated_ids"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a", "--prompt", "Once upon a time", "--press", "decoding", "--press_kwargs", "base_press=knorm",
      "--batch_size", "2"], "decoding cannot compress a padded batch"),
    (["--prompt", "Once upon", "--press", "knorm", "--prefill_chunk_size", "0"], "--prefill_chunk_size must be a "),
    (["--prompt", "Once", "--press", "knorm", "--prefill_chunk_size", "50"], "prefill_chunk_size=50 is invalid"),
    (["--prompt", "a", "--prompt", " ", "--batch_size", "2"], "Prompt 2 of 2 is empty"),
])
def test_generate_command_bad_batch_input_exits_2_in_one_line(args, message, capsys):
    from conftest import shared_path

    from kvpress_ext.cli import main

    rc = main(["generate", "--model", str(shared_path("models", "stories260k")), "--no_progress", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1


SMOLLM2_SETTINGS = {
    "snapkv": {"compression_ratio": 0.5, "window_size": 16}, "knorm": {"compression_ratio": 0.5},
    "expected_attention": {"compression_ratio": 0.5}, "rkv": {"budget": 64, "window_size": 8, "compression_interval": 8},
    "lazy_streaming": {"cap_total": 64, "slack": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOLLM2_SETTINGS))
def test_smollm2_padded_batch_answers_as_each_sequence_alone(name, smollm2, two_threads):
    from conftest import shared_path

    model, tok = smollm2
    text = " ".join(shared_path("data", "pride_and_prejudice.txt").read_text(encoding="utf-8").split()[2000:2400])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    contexts = [ids[:150], ids[150:250], ids[250:370]]
    questions = [tok(q, add_special_tokens=False)["input_ids"] for q in ("\nWho is speaking?", "\nWhere?", "\nWhy?")]
    run = {"max_new_tokens": 5}
    alone = [generate_batch(model, [c], get_press(name, **SMOLLM2_SETTINGS[name]), questions=[q], **run)[0]
             for c, q in zip(contexts, questions)]
    batched = generate_batch(model, contexts, get_press(name, **SMOLLM2_SETTINGS[name]), questions=questions, **run)
    _assert_same(alone, batched)


def _padded_cache(model, lengths=(6, 4), seed=0):
    """A cache holding a left-padded batch of sequences of ``lengths`` (tracked, uncompressed)."""
    width = max(lengths)
    ids = torch.randint(4, 120, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    cache = DynamicCache()
    with torch.no_grad(), apply_press(None, model):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    return cache


class _KeepLast:
    """A whole-cache press that keeps the last ``keep[layer][row]`` tokens of each layer, recording what it saw."""

    def __init__(self, keep):
        self.keep, self.seen = keep, []

    def after_forward(self, row):
        self.seen.append([(layer.keys, layer.values) for layer in row.layers])
        for j, layer in enumerate(row.layers):
            n = self.keep[j][len(self.seen) - 1]
            if n is not None:
                layer.keys, layer.values = layer.keys[:, :, -n:], layer.values[:, :, -n:]


def test_a_whole_cache_press_sees_each_sequence_alone_and_its_rows_go_back_right_aligned(tiny_models):
    model = tiny_models["llama"]
    cache = _padded_cache(model)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    press = _KeepLast([[4, 2], [4, 2]])
    with torch.device("meta"):  # another default device: the mask is made on the cache's device
        per_row_after_forward(press, cache)
    for i, n in enumerate((6, 4)):
        for j, (keys, values) in enumerate(press.seen[i]):
            assert torch.equal(keys, before[j][0][i : i + 1, :, 6 - n :])
            assert torch.equal(values, before[j][1][i : i + 1, :, 6 - n :])
    assert padded_batch(cache).mask.tolist() == [[True] * 4, [False, False, True, True]]
    assert padded_batch(cache).mask.device.type == "cpu"
    for j, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys[0], before[j][0][0, :, 2:]) and torch.equal(layer.keys[1, :, 2:],
                                                                                  before[j][0][1, :, 4:])
        assert torch.equal(layer.values[1, :, 2:], before[j][1][1, :, 4:])
    rows = row_caches(cache, padded_batch(cache))
    assert all(rl.keys is None and rl.values is None for row in rows for rl in row.layers)  # the cache holds them


def test_a_whole_cache_press_that_kept_everything_leaves_the_cache_as_it_was(tiny_models):
    cache = _padded_cache(tiny_models["llama"])
    tensors = [(layer.keys, layer.values) for layer in cache.layers]
    mask = padded_batch(cache).mask
    per_row_after_forward(_KeepLast([[None, None], [None, None]]), cache)
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, tensors))
    assert padded_batch(cache).mask is mask


@pytest.mark.parametrize("keep", [[[3, 2], [2, 2], [3, 2]], [[2, 2], [3, 2], [3, 2]]], ids=["middle", "first"])
def test_a_whole_cache_press_keeping_different_counts_per_layer_is_refused(keep):
    cache = _padded_cache(tiny_model("llama", layers=3))
    with pytest.raises(BatchInputError, match=r"^The press kept a different number of tokens in different layers, "
                                              r"which one attention mask cannot describe: run this press one "
                                              r"sequence at a time \(batch_size=1\)\.$"):
        per_row_after_forward(_KeepLast(keep), cache)


def test_a_whole_cache_press_on_a_one_layer_model():
    cache = _padded_cache(tiny_model("llama", layers=1))
    per_row_after_forward(_KeepLast([[3, 1]]), cache)
    assert padded_batch(cache).mask.tolist() == [[True, True, True], [False, False, True]]


def test_a_row_cache_shows_one_sequence_as_a_batch_one_cache():
    state = PositionState(next_position=7)
    row = RowCache(state, 2)
    assert len(row) == 2 and row.get_seq_length() == 0 and row.get_seq_length(1) == 0
    assert next_position(row) == 7 and position_state(row) is state
    row.layer(3).keys = torch.zeros(1, 2, 3, 4)
    assert len(row) == 4 and row.layer(3) is row.layers[3] and row.get_seq_length(3) == 3
    row.layers[0].keys = torch.zeros(1, 2, 5, 4)
    assert row.get_seq_length() == 5


def test_a_press_that_rerotates_sets_each_sequences_next_position_to_its_length(tiny_models):
    cache = _padded_cache(tiny_models["llama"], lengths=(6, 4, 5))
    batch = padded_batch(cache)
    assert [s.next_position for s in batch.rows] == [6, 4, 5]
    batch.mask = batch.mask.clone()
    batch.mask[0, 1] = False  # a row that lost a token
    row_lengths_follow_cache(cache)
    assert [(s.next_position, s.rotated) for s in batch.rows] == [(5, True), (4, True), (5, True)]


@pytest.mark.parametrize("name", ["knorm", "rkv"])
def test_a_one_token_context_in_a_batch_answers_as_alone(name, tiny_models):
    """A sequence with a single real token among longer ones: its one slot is cut out, compressed and put back."""
    model = tiny_models["llama"]
    contexts, questions = _sequences(seed=2)
    contexts[0] = contexts[0][:1]
    alone = [generate_batch(model, [c], build(name, model), questions=[q], max_new_tokens=4)[0]
             for c, q in zip(contexts, questions)]
    _assert_same(alone, generate_batch(model, contexts, build(name, model), questions=questions, max_new_tokens=4))


def test_a_sequence_without_a_token_in_a_step_keeps_its_cache_while_the_others_are_compressed(tiny_models):
    """A step whose mask pads one sequence (it finished): R-KV compresses the other back to its budget, the padded
    one keeps its slots and position, and the pad never becomes one of its tokens."""
    model = tiny_models["llama"]
    ids = torch.randint(4, 120, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :10] = 0
    cache = DynamicCache()
    with torch.no_grad(), apply_press(get_press("rkv", budget=16, window_size=4, compression_interval=1), model):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        before = cache.layers[0].keys[1].clone()
        model(input_ids=ids[:, :1], attention_mask=torch.tensor([[1], [0]]), past_key_values=cache)
    batch = padded_batch(cache)
    assert batch.lengths.tolist() == [16, 16] and [row.next_position for row in batch.rows] == [31, 20]
    torch.testing.assert_close(cache.layers[0].keys[1], before, atol=0, rtol=0)


@dataclass
class _RecordsRows(kvpress.BasePress):
    """Records the keyword arguments its hook gets, per call; compresses nothing."""

    def __post_init__(self):
        self.seen = []

    def press_contract(self):
        return PressContract(batches=True)

    def forward_hook(self, module, input, kwargs, output):
        if module.layer_idx == 0:
            self.seen.append(dict(kwargs, hook_input=input, hook_output=output))
        return output


def test_a_press_on_a_batch_sees_each_sequences_own_forward_as_if_alone(tiny_models):
    """Each sequence's hook call gets the layer's other arguments, no attention mask, its own hidden states and the
    cache positions of its own new tokens in its own cache, at the prefill and at a decoding step."""
    model = tiny_models["llama"]
    lengths = (6, 4)
    ids = torch.randint(4, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(6) >= 6 - torch.tensor(lengths)[:, None]).long()
    alone = _RecordsRows()
    with torch.no_grad(), apply_press(alone, model):
        model(input_ids=ids[:1], past_key_values=DynamicCache())
    press = _RecordsRows()
    with torch.no_grad(), apply_press(press, model), torch.device("meta"):  # tensors on the inputs' device
        cache = DynamicCache()
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        model(input_ids=ids[:, :1], past_key_values=cache)
        rows = row_caches(cache, padded_batch(cache))
    assert len(press.seen) == 4
    assert all(layer.keys is None and layer.values is None for row in rows for layer in row.layers)
    for step, first in ((0, True), (1, False)):
        for i, n in enumerate(lengths):
            kwargs = press.seen[2 * step + i]
            assert set(kwargs) == set(alone.seen[0]) and kwargs["attention_mask"] is None
            assert isinstance(kwargs["past_key_values"], RowCache)
            new = n if first else 1
            assert kwargs["hidden_states"].shape == (1, new, model.config.hidden_size)
            assert kwargs["position_ids"].tolist() == [list(range(n)) if first else [n]]
            assert [x.shape[:2] for x in kwargs["position_embeddings"]] == [(1, new)] * 2
            assert isinstance(kwargs["hook_input"], list)
            output, weights = kwargs["hook_output"]
            assert output.shape == (1, new, model.config.hidden_size) and weights is None
            assert kwargs["cache_position"].tolist() == (list(range(n)) if first else [n])
            assert kwargs["cache_position"].device.type == "cpu"


@pytest.mark.parametrize("name", ["knorm", "rkv"])
def test_a_single_left_padded_sequence_is_compressed_as_without_its_pads(name, tiny_models):
    """A batch of one sequence whose mask still marks pads (a tokenizer padding to a fixed length)."""
    model = tiny_models["llama"]
    context, _ = _sequences(seed=3)
    ids = torch.tensor([[0] * 5 + context[1]])
    mask = torch.tensor([[0] * 5 + [1] * len(context[1])])
    logits = []
    for kwargs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:, 5:]}):
        cache = DynamicCache()
        with torch.no_grad(), apply_press(build(name, model), model):
            model(**kwargs, past_key_values=cache)
            logits.append(model(input_ids=torch.tensor([[7, 8]]), past_key_values=cache).logits)
        assert cache.get_seq_length() < len(context[1])  # compressed
    torch.testing.assert_close(logits[0], logits[1], atol=TOL, rtol=0)


@dataclass
class _DoublesKeys(_RecordsRows):
    """Doubles the keys of the sequences in ``rows`` (values untouched)."""

    rows: tuple = ()

    def forward_hook(self, module, input, kwargs, output):
        row = kwargs["past_key_values"]
        if row in [row_caches(self.cache, padded_batch(self.cache))[i] for i in self.rows]:
            layer = row.layers[module.layer_idx]
            layer.keys = layer.keys * 2
        return output


def test_a_press_that_changes_only_the_keys_of_one_sequence_changes_only_those(tiny_models):
    model = tiny_models["llama"]
    caches = []
    for rows in ((), (1,)):
        press, cache = _DoublesKeys(rows=rows), DynamicCache()
        press.cache = cache
        ids, mask = torch.randint(4, 120, (2, 6), generator=torch.Generator().manual_seed(0)), torch.ones(2, 6)
        mask[1, :2] = 0
        with torch.no_grad(), apply_press(press, model), torch.device("meta"):  # the new mask on the cache's device
            model(input_ids=ids, attention_mask=mask.long(), past_key_values=cache)
        caches.append(cache)
    plain, doubled = (c.layers[0] for c in caches)
    torch.testing.assert_close(doubled.keys[0], plain.keys[0], atol=0, rtol=0)
    torch.testing.assert_close(doubled.keys[1, :, 2:], 2 * plain.keys[1, :, 2:], atol=0, rtol=0)
    torch.testing.assert_close(doubled.values[0], plain.values[0], atol=0, rtol=0)
    torch.testing.assert_close(doubled.values[1, :, 2:], plain.values[1, :, 2:], atol=0, rtol=0)  # pads aside
    assert padded_batch(caches[1]).mask.device.type == "cpu"


def test_row_caches_live_on_the_real_cache_when_a_press_gets_the_gpt_neox_view(tiny_models):
    """GPT-NeoX presses see a view of the cache in their own key basis, made anew for each call: the sequences' row
    caches (and the press state kept on them) must be those of the real cache."""
    from kvpress_ext.core.adapters.gpt_neox import CacheBasisView

    cache = _padded_cache(tiny_models["gpt_neox"])
    batch = padded_batch(cache)
    rows = row_caches(CacheBasisView(cache, torch.arange(4)), batch)
    assert row_caches(CacheBasisView(cache, torch.arange(4)), batch) is rows
    assert row_caches(cache, batch) is rows


def test_a_press_that_cannot_batch_stops_a_padded_forward_before_the_model_runs(tiny_models):
    """Under ``apply_press`` alone (no pipeline, no generate_batch to check first), a left-padded forward of a press
    that does not claim batches is refused by the decoder's pre-hook, naming the press; the cache stays empty. The
    same forward without padding runs."""
    model = tiny_models["llama"]
    contexts, _ = _sequences()
    width = max(LENGTHS)
    ids, mask = _left_padded(contexts, width)
    press = kvpress.PyramidKVPress(compression_ratio=0.5)
    cache = DynamicCache()
    with torch.no_grad(), apply_press(press, model), pytest.raises(BatchInputError, match=r"cannot compress a padded"
                                                                                           r" batch \(its compression"):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert cache.get_seq_length() == 0
    with torch.no_grad(), apply_press(press, model):
        model(input_ids=ids[:1, width - LENGTHS[0]:], past_key_values=DynamicCache())  # one sequence: no padding
