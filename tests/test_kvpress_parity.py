"""Every kvpress press answers through our pipeline as through kvpress's own: same answers, same caches.

Importing kvpress_ext replaces the class registered for the ``kv-press-text-generation`` task; kvpress's own
``KVPressTextGenerationPipeline`` stays importable and untouched, so both run side by side in this process on one
tiny random model: ours from ``pipeline(...)``, kvpress's built from its class. Each press is built by its registry
name with its registry defaults (plus the settings below that let it compress a short context), once per pipeline.

Compared after each call: the answer, the key and value tensors of every layer (what the pipeline leaves in a
``cache=`` it was given: the compressed context) and the keys a head-wise press masks (``masked_key_indices``, how
KVzip, AdaKV and DMS evict). Tolerance 1e-6 (absolute and relative): both pipelines run the same kernels on the same
inputs, so anything above float32 rounding is a real difference (a position, a token, an eviction).

Presses whose ``requires`` note says they need the hub run here on stand-ins where one is cheap: a local
checkpoint folder holding the tiny tokenizer (KVzip and KVgrad load the tokenizer by the model's name), restore
embeddings and no-op LoRA switches (RestoreKV), saved random query statistics (expected-attention statistics) and
the delimiter token added to the tokenizer (Finch). The others cannot run offline (:data:`CANNOT_RUN_OFFLINE`).
"""

import warnings

import kvpress
import pytest
import torch
from kvpress.presses import restorekv_press
from kvpress.presses.expected_attention_with_stats import ExpectedAttentionStats
from safetensors.torch import save_file
from transformers import DynamicCache, pipeline

import kvpress_ext
from kvpress_ext.core.errors import NoCompressionWarning
from kvpress_ext.core.kvpress_table import kvpress_press_classes
from kvpress_ext.core.registry import constructor_parameters
from kvpress_ext.testing import tiny_model, tiny_tokenizer

#: kvpress's pipeline runs ``model.model``: every tiny architecture but GPT-NeoX (``model.gpt_neox``).
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
#: 270 characters: KVCompose keeps a different number of tokens per layer, which kvpress's own decoding then
#: fails to mask unless the per-layer counts happen to line up; at this length they do on every tiny model here.
CONTEXT = ("Once upon a time there was a fox who lived in a wood. " * 5)[:270]
QUESTION = " Who?"
NEW_TOKENS = 8
TOLERANCE = {"atol": 1e-6, "rtol": 1e-6}

PRESSES = kvpress_ext.available_presses()
#: Every registered kvpress press (a plugin may have replaced a kvpress name: then it is not kvpress's).
KVPRESS = sorted(n for n, cls in kvpress_press_classes().items() if n in PRESSES and PRESSES[n].cls is cls)

#: Presses with a hub requirement that a stand-in below replaces.
STAND_INS = {
    "kvzip": "a local checkpoint folder with the tokenizer",
    "kvgrad": "a local checkpoint folder with the tokenizer",
    "restorekv": "a local restore-embeddings file; LoRA switches that do nothing",
    "expected_attention_stats": "random query statistics saved in a local folder",
    "finch": "the delimiter token added to the tokenizer (update_model_and_tokenizer)",
}
#: Presses that cannot run offline on a random model, and why.
CANNOT_RUN_OFFLINE = {
    "duo_attention": "attention patterns measured on a supported checkpoint (hub), or a hub dataset to score on",
    "qfilter": "Q-filters trained for a supported checkpoint (hub)",
    "kvzap": "a scorer model trained for a supported checkpoint (hub)",
    "fastkvzip": "gates trained for a supported checkpoint (hub)",
    "lukv": "a budget curve measured for a supported checkpoint (downloaded)",
}


def settings(name: str, model) -> dict:
    """Registry defaults plus what makes the press compress this short context."""
    params = {p.name for p in constructor_parameters(PRESSES[name].cls)}
    kw = {"compression_ratio": 0.5} if "compression_ratio" in params else {}
    if name == "per_layer_compression":  # no default: one ratio per layer
        kw = {"compression_ratios": [0.5] * model.config.num_hidden_layers}
    if name == "pyramidkv":  # its default window (64) leaves no room for the pyramid on 270 tokens
        kw["window_size"] = 16
    if name in ("decoding", "cam", "compression_ratio_decoding"):
        kw["compression_interval"] = 4
    if name in ("decoding", "cam"):
        kw["target_size"] = 200
    if name == "compression_ratio_decoding":
        kw["target_compression_ratio"] = 0.5
    if name == "expected_attention_stats":
        kw["stats_folder"] = None  # set by the stand-in
    return kw


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local folder standing in for a hub checkpoint: the tiny tokenizer, loadable by name."""
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-checkpoint"
    tiny_tokenizer().save_pretrained(folder)
    return folder


def stats_folder(model, tmp_path) -> str:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    stats = ExpectedAttentionStats(
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads, head_dim=head_dim,
        dataset_name="none", model_name="tiny", num_samples=1, sample_seq_len=1, n_sink=4,
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        stats.query_mean.copy_(torch.randn(stats.query_mean.shape, generator=g))
        a = torch.randn(stats.query_cov.shape, generator=g)
        stats.query_cov.copy_(a @ a.transpose(-1, -2) / head_dim)  # a covariance: positive semi-definite
    stats.save_pretrained(tmp_path / "stats")
    return str(tmp_path / "stats")


def restore_kv_stand_in(model, tmp_path, monkeypatch) -> None:
    """RestoreKV downloads restore embeddings and a LoRA adapter: embeddings from a local file, adapter switches
    that leave the model as it is (the restore tokens then pass through the base model)."""
    path = tmp_path / "restore_embeddings.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({"restore_embeddings": torch.randn(8, model.config.hidden_size, generator=g)}, str(path))
    monkeypatch.setattr(restorekv_press, "hf_hub_download", lambda *args, **kwargs: str(path))
    for method in ("load_adapter", "set_adapter", "enable_adapters", "disable_adapters"):
        monkeypatch.setattr(model, method, lambda *args, **kwargs: None, raising=False)


def build(name: str, model, extra: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCompressionWarning)
        return kvpress_ext.get_press(name, **{**settings(name, model), **extra})


def snapshot(model, cache) -> dict:
    """What a call leaves behind: each layer's keys and values, and each attention module's masked keys."""
    masked = []
    for layer in model.model.layers:
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        masked.append(None if indices is None else [i.clone() for i in indices])
    return {"keys": [layer.keys.clone() for layer in cache.layers],
            "values": [layer.values.clone() for layer in cache.layers], "masked": masked}


def run(pipe, press, context):
    """(answer, snapshot), or (the error's type and message, None) when the pipeline raises."""
    cache = DynamicCache()
    torch.manual_seed(0)
    try:
        answer = pipe(context, question=QUESTION, press=press, max_new_tokens=NEW_TOKENS, cache=cache)["answer"]
    except Exception as exc:  # noqa: BLE001 - kvpress's own failures on tiny models: ours must fail the same way
        return f"{type(exc).__name__}: {exc}", None
    return answer, snapshot(pipe.model, cache)


def assert_same_snapshot(got: dict, want: dict, name: str) -> None:
    for part in ("keys", "values"):
        assert [t.shape for t in got[part]] == [t.shape for t in want[part]], (name, part)
        for a, b in zip(got[part], want[part], strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, part=part: f"{name} {part}: {m}")
    assert len(got["masked"]) == len(want["masked"])
    for a, b in zip(got["masked"], want["masked"], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (name, "masked_key_indices")


def test_presses_not_run_are_exactly_those_that_need_the_hub_without_a_stand_in():
    needs_hub = {n for n in KVPRESS if PRESSES[n].requires}
    assert set(CANNOT_RUN_OFFLINE) == needs_hub - set(STAND_INS)
    assert set(STAND_INS) <= needs_hub  # a stand-in replaces something the press would download


def test_the_takeover_leaves_kvpress_pipeline_class_untouched():
    """The reference side is kvpress's own pipeline: its class, not a subclass of ours."""
    assert kvpress.KVPressTextGenerationPipeline.__module__ == "kvpress.pipeline"
    assert not issubclass(kvpress.KVPressTextGenerationPipeline, kvpress_ext.KVPressExtPipeline)


def compare(name: str, model, tokenizer, context: str = CONTEXT, extra: dict | None = None, press_setup=None) -> dict:
    """Run press ``name`` through kvpress's pipeline then ours (a fresh press each); assert the same answer and
    caches. Returns kvpress's snapshot."""
    presses = [build(name, model, extra or {}) for _ in range(2)]
    for press in presses:
        if press_setup is not None:
            press_setup(press)
    ours = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    theirs = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    assert type(ours) is kvpress_ext.KVPressExtPipeline
    want = run(theirs, presses[0], context)
    got = run(ours, presses[1], context)
    assert got[0] == want[0], (name, got[0], want[0])
    if want[1] is not None:
        assert_same_snapshot(got[1], want[1], name)
    return want[1]


#: Presses that keep a different number of tokens per layer: kvpress's pipeline builds the attention mask from the
#: first layer's length, which the other layers then fail to match under sdpa (flash attention takes no mask), so
#: they are compared on a one-layer model. A two-layer model also runs them: both pipelines must fail alike there.
UNEVEN_LAYERS = ("chunkkv", "kvcompose", "pyramidkv")
#: kvpress's own failures on one architecture (ours must fail alike).
KVPRESS_FAILS_ON = {"qwen2": {"criticalkv": "reads config.head_dim, which Qwen2's config lacks",
                              "critical_adakv": "reads config.head_dim, which Qwen2's config lacks"}}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kvpress_press_answers_and_caches_as_in_kvpress_pipeline(arch, checkpoint, tmp_path, monkeypatch):
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    model.config.name_or_path = str(checkpoint)
    restore_kv_stand_in(model, tmp_path, monkeypatch)
    stats = stats_folder(model, tmp_path)
    compared, failed_alike, differ = [], [], []
    for name in KVPRESS:
        if name in CANNOT_RUN_OFFLINE or name == "finch":  # finch: a model of its own (below)
            continue
        extra = {"stats_folder": stats} if name == "expected_attention_stats" else {}
        model.set_attn_implementation("eager" if name == "observed_attention" else "sdpa")  # it reads the weights
        try:
            kept = compare(name, model, tokenizer, extra=extra)
        except AssertionError as exc:  # go on: one run names every press that differs
            differ.append(f"{name}: {str(exc)[:300]}")
            continue
        finally:
            model.set_attn_implementation("sdpa")
        (compared if kept is not None else failed_alike).append(name)
    assert not differ, "\n".join(differ)
    assert set(failed_alike) <= set(UNEVEN_LAYERS) | set(KVPRESS_FAILS_ON.get(arch, {})), failed_alike
    assert len(compared) + len(failed_alike) == len(KVPRESS) - len(CANNOT_RUN_OFFLINE) - 1
    assert len(compared) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_finch_answers_and_caches_as_in_kvpress_pipeline(arch):
    """Finch finds the question window by a delimiter token in the context; the tokenizer and the model's
    embeddings grow by that token (a model of its own, so the other presses' model is unchanged)."""
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    delimiter = "<|finch_sep|>"
    context = CONTEXT[:200] + delimiter + CONTEXT[200:]
    kept = compare("finch", model, tokenizer, context,
                   press_setup=lambda press: press.update_model_and_tokenizer(model, tokenizer, delimiter))
    assert kept["keys"][0].shape[2] < len(tokenizer.encode(context)) - 1  # it compressed


@pytest.mark.slow
@pytest.mark.parametrize("name", UNEVEN_LAYERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_presses_with_uneven_layers_answer_and_cache_as_in_kvpress_pipeline(arch, name):
    """On one layer nothing is uneven: both pipelines answer, and compress. (KVCompose's second pass over the context
    must see the positions after the context, as in kvpress.)"""
    model, tokenizer = tiny_model(arch, layers=1), tiny_tokenizer()
    kept = compare(name, model, tokenizer)
    assert kept is not None and kept["keys"][0].shape[2] < len(tokenizer.encode(CONTEXT))
