"""Long-context evaluation of every press (and A3 fusion) as a grid of cells.

The three scripts (``evaluation/needle.py``, ``ruler.py``, ``longbench.py``) build cells here: one sample
(a haystack of ``length`` tokens with a needle at ``depth``, or one record of a data file) answered by one
method at one compression ratio in one mode. :func:`run_cell` answers a cell from its plain parameters;
:func:`run_cells` runs the grid resumably (:func:`kvpress_ext.evaluation.sweep.run_sweep`: local or Ray); :func:`write_outputs` writes
``summary.json`` (one record per method x ratio x mode x length x depth), ``summary.md`` (safe ratio,
accuracy, needle-kept diagnostic, A3 time to first token) and the heat maps.

Methods:

* a registered press name (``no_press``, ``snapkv``, ``rkv``, ...): the prompt is split by
  :func:`split_prompt` (the chat template from :func:`kvpress_ext.runtime.chat.split_chat_prompt`); the press compresses the first part while it is prefilled
  (in chunks for a press with ``prefill_chunk_size``), the rest is fed and the answer decoded greedily with
  the press still active if it compresses while decoding (as :class:`kvpress_ext.runtime.pipeline.KVPressExtPipeline`
  does). Budget presses get the budget that keeps ``1 - ratio`` of the compressed part
  (:func:`~kvpress_ext.evaluation.run_perplexity.build_press`).
* ``prefill`` / ``a3-<strategy>`` / ``a3-<strategy>+<press>``: the chunk-cache fusion comparison of
  :func:`kvpress_ext.evaluation.longcontext.answer` (question-agnostic only: the chunks are cached before any
  question exists).

Diagnostic: for a needle sample, the fraction of the needle's tokens each layer kept (averaged over
KV heads), measured on the cache from which the first answer token is produced. A kept entry is matched to the
token it came from by mutual nearest neighbour against an uncompressed prefill of the same tokens (keys and
values; values only when the press re-rotated keys). Exact for presses that copy entries in one prefill pass,
approximate for presses that stream the prefill in chunks; presses that mask instead of evicting (adakv) show 1.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.sweep import Cell

NEEDLE_TASKS = ("passkey", "niah_single", "multikey", "multivalue")
MULTIDOC = "multidoc"  # the pass key in one of several documents (needle.py --task multidoc)
KEYS = ["sunset", "harbor", "violin", "glacier", "lantern", "meadow", "falcon", "comet", "orchid", "quartz",
        "pepper", "canyon", "ember", "willow", "saturn", "marble"]
A3_PREFIX = "a3-"
PREFILL = lc.PREFILL


# --- methods ----------------------------------------------------------------------------------------------
def is_a3(method: str) -> bool:
    return method == PREFILL or method.startswith(A3_PREFIX)


def a3_parts(method: str) -> tuple[str | None, str | None]:
    """(strategy, evict press) of a fusion method name; (None, None) for ``prefill``."""
    if method == PREFILL:
        return None, None
    strategy, _, evict = method[len(A3_PREFIX):].partition("+")
    return strategy, evict or None


def mode_error(method: str, query_aware: bool) -> str | None:
    """Why ``method`` cannot run in this mode, or None."""
    if query_aware and is_a3(method):
        return (f"{method} fuses chunk caches stored before any question exists, so it has no question-aware mode: "
                "run it without --query_aware")
    return None


def expand_presses(names: list[str]) -> list[str]:
    """Press names with ``all`` expanded to every registered press (those that need a download stay in, and
    fail as cells with the reason); ``no_press`` first."""
    from kvpress_ext.core.registry import available_presses, press_info

    out = []
    for name in names:
        if name == "all":
            out += [n for n in available_presses() if n not in ("a3",)]
        else:
            try:
                press_info(name)
            except Exception as e:  # noqa: BLE001 - UnknownPressError with close names
                raise lc.InputError(str(e).splitlines()[0]) from None
            out.append(name)
    out = list(dict.fromkeys(out))
    if "a3" in out:
        raise lc.InputError("a3 needs chunk caches: pass it as --strategies STRATEGY, not --press a3")
    return ["no_press"] + [n for n in out if n != "no_press"] if out else []


# --- samples ----------------------------------------------------------------------------------------------
_HAYSTACKS: dict[str, list[str]] = {}


def haystack_sentences(path: str) -> list[str]:
    if path not in _HAYSTACKS:
        _HAYSTACKS[path] = lc.load_haystack(path)
    return _HAYSTACKS[path]


def pass_key(rng: random.Random) -> str:
    """5 to 7 random digits (no leading zero)."""
    digits = rng.randint(5, 7)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def needle_sample(tokenizer, params: dict) -> lc.Sample:
    """The sample of a needle cell, fully determined by its parameters (task, haystack, length, depth,
    key_index, seed, n_needles): the same sample for every method, ratio and mode."""
    task, length, depth = params["task"], params["length"], params["depth"]
    if task == MULTIDOC:
        return multidoc_sample(tokenizer, params)
    n = max(1, int(params.get("n_needles", 1)))
    rng = random.Random(f"{params['seed']}:{task}:{length}:{depth}:{params['key_index']}")
    sentences = haystack_sentences(params["haystack"])
    if task == "passkey":
        value = pass_key(rng)
        needles = [(depth, f"The pass key is {value}. Remember it. {value} is the pass key.")]
        # Wording chosen on three no-press SmolLM2 probes: "What is the pass key?" alone got 0/3 (the model
        # defines the phrase); asking for the digits got 3/3.
        question = "What is the pass key mentioned in the text? Reply with the digits of the pass key."
        prefix, answers, targets = "The pass key is", [value], [0]
    elif task in ("niah_single", "multikey"):
        keys = rng.sample(KEYS, 1 if task == "niah_single" else n)
        values = [pass_key(rng) for _ in keys]
        needles = [(depth if i == 0 else rng.random(), f"One of the special magic numbers for {k} is: {v}.")
                   for i, (k, v) in enumerate(zip(keys, values))]
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        answers, targets = [values[0]], [0]
    elif task == "multivalue":
        key = rng.choice(KEYS)
        values = list(dict.fromkeys(pass_key(rng) for _ in range(n)))
        needles = [(depth if i == 0 else rng.random(), f"One of the special magic numbers for {key} is: {v}.")
                   for i, v in enumerate(values)]
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        answers, targets = values, list(range(len(values)))
    else:
        raise lc.InputError(f"unknown task {task!r}; choose from {', '.join(NEEDLE_TASKS)}")
    context, _ = lc.build_haystack_multi(tokenizer, sentences, length, needles)
    return lc.Sample(id=f"{task}-{length}-{depth}-{params['key_index']}", context=context, question=question,
                     answers=answers, meta={"answer_prefix": prefix,
                                            "needle_texts": [needles[i][1] for i in targets]})


_DOCUMENTS: dict[str, list[tuple[str, str]]] = {}
PASS_KEY_QUESTION = "What is the pass key mentioned in the {where}? Reply with the digits of the pass key."


def multidoc_sample(tokenizer, params: dict) -> lc.Sample:
    """Multi-document QA: ``length // chunk_tokens`` documents (the starts of distinct files of the folder
    ``haystack`` of at least ``chunk_tokens`` words, each cut to ``chunk_tokens`` tokens, headed ``Document [i] (Title: stem)`` as a
    retrieval-augmented prompt is), the pass key in the middle of document ``depth x (N - 1)`` (rounded half up). The
    files and the key depend on (seed, length, key_index) only, so the depths of one key move only the needle."""
    length, depth, chunk = params["length"], params["depth"], params["chunk_tokens"]
    key = f"{params['haystack']}:{chunk}"
    if key not in _DOCUMENTS:
        _DOCUMENTS[key] = lc.check_documents(params["haystack"], [chunk], chunk)  # the files long enough
    n = lc.n_documents(length, chunk)
    docs = _DOCUMENTS[key] if 1 <= n <= len(_DOCUMENTS[key]) else lc.check_documents(params["haystack"], [length], chunk)
    rng = random.Random(f"{params['seed']}:{MULTIDOC}:{length}:{params['key_index']}")
    picked = rng.sample(range(len(docs)), n)
    value = pass_key(rng)
    needle = f"The pass key is {value}. Remember it. {value} is the pass key."
    target = int(depth * (n - 1) + 0.5)  # rounded half up
    documents = [lc.build_document(tokenizer, i + 1, *docs[j], chunk, needle if i == target else None)
                 for i, j in enumerate(picked)]
    return lc.Sample(id=f"{MULTIDOC}-{length}-{depth}-{params['key_index']}", context="\n\n".join(documents),
                     question=PASS_KEY_QUESTION.format(where="documents"), answers=[value],
                     meta={"answer_prefix": "The pass key is", "needle_texts": [needle], "documents": documents,
                           "needle_document": target, "titles": [docs[j][0] for j in picked]})


_FILES: dict[str, list[dict]] = {}


def file_sample(params: dict) -> lc.Sample:
    """Record ``index`` of a RULER-style (context/question/outputs) or LongBench-style (context/input/answers)
    JSON/JSONL file, or of THUDM/LongBench ``task`` from the hub when ``data_file`` is None."""
    path, kind = params.get("data_file"), params["format"]
    key = f"{kind}:{path}:{params.get('task')}"
    if key not in _FILES:
        if path:
            records = lc.read_records(path)
            lc.require_fields(records, ("context", "question", "outputs") if kind == "ruler"
                              else ("context", "input", "answers"), path)
        else:
            import datasets

            records = list(datasets.load_dataset("THUDM/LongBench", params["task"], split="test"))
        _FILES[key] = records
    r = _FILES[key][params["index"]]
    if kind == "ruler":
        outputs = r["outputs"] if isinstance(r["outputs"], list) else [r["outputs"]]
        return lc.Sample(id=str(r.get("index", params["index"])), context=r["context"], question=r["question"],
                         answers=[str(o) for o in outputs], meta={"answer_prefix": r.get("answer_prefix", "")})
    answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
    return lc.Sample(id=str(r.get("_id", params["index"])), context=r["context"], question=f"Question: {r['input']}",
                     answers=[str(a) for a in answers], all_classes=r.get("all_classes"),
                     meta={"answer_prefix": "Answer:"})


def score(params: dict, sample: lc.Sample, prediction: str) -> float:
    from kvpress_ext.evaluation.metrics import score_longbench, substring_match

    if params.get("format") == "longbench":
        return float(score_longbench(params["task"], prediction, sample.answers, sample.all_classes))
    # RULER's string_match_all: the fraction of expected answers found in the prediction
    return sum(substring_match(prediction, [a]) for a in sample.answers) / len(sample.answers)


# --- model, prompt ----------------------------------------------------------------------------------------
@dataclass
class PromptParts:
    compressed: str  # what the press sees before the answer is asked for
    rest: str  # fed after compression (question-agnostic: the question; always: the assistant header)
    context_start: int  # character offset of the context inside ``compressed``
    chat_template: bool


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "", query_aware: bool = False,
                 use_chat_template: bool = True) -> PromptParts:
    """The prompt of :func:`kvpress_ext.runtime.chat.split_chat_prompt` (user turn = context, blank line, question) cut
    where the press stops compressing. Two modes, as in kvpress's evaluation: question-agnostic (default), the
    press compresses ``prefix + context`` and the question comes after; question-aware, it compresses
    ``prefix + context + blank line + question`` and only the end of the turn and the assistant header come after.
    Without a template the blank line is kept (raw ``BOS + context + blank line + question``)."""
    from kvpress_ext.runtime.chat import separator, split_chat_prompt

    sep = separator(context, question)  # in the context part: split_chat_prompt then adds no other separator
    prompt = split_chat_prompt(tokenizer, context + sep, question, use_chat_template=use_chat_template)
    cut = prompt.suffix.find(question) + len(question) if query_aware and question else 0
    head = prompt.prefix + context
    compressed = head + (sep + prompt.suffix[:cut] if query_aware else "")
    rest = ("" if query_aware else sep) + prompt.suffix[cut:]
    if answer_prefix and not prompt.templated and not (compressed + rest)[-1:].isspace():
        answer_prefix = " " + answer_prefix  # completion-style: "...? The pass key is", not "...?The pass key is"
    return PromptParts(compressed, rest + answer_prefix, len(prompt.prefix), prompt.templated)


_MODELS: dict[tuple, tuple] = {}


def get_model(name: str, attn_implementation: str | None = None):
    key = (name, attn_implementation)
    if key not in _MODELS:
        from kvpress_ext.runtime.models import load_model

        _MODELS[key] = load_model(name, attn_implementation=attn_implementation)
        if not getattr(_MODELS[key][1], "chat_template", None):  # a base model (gemma3-270m): say how it is prompted
            print(f"note: {name} has no chat template: prompts are completion-style (BOS, context, blank line, "
                  "question, answer prefix); cells record chat_template: false", file=sys.stderr)
    return _MODELS[key]


def preload_model(name: str, model, tokenizer, attn_implementation: str | None = None) -> None:
    """Make ``run_cell`` use an already built model for ``name`` (tests with tiny random models)."""
    _MODELS[(name, attn_implementation)] = (model, tokenizer)


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def token_positions(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int] | None:
    """Indices of the tokens of ``text`` that overlap any character span; None without offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


# --- the needle diagnostic --------------------------------------------------------------------------------
_REFERENCES: OrderedDict = OrderedDict()


@torch.no_grad()
def reference_kv(model, ids: list[int], name: str = "") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of an uncompressed prefill of ``ids`` (batch 0: heads x tokens x dim),
    memoised for the last two token sequences (the cells of one sample run one after another)."""
    from transformers import DynamicCache

    from kvpress_ext.core.adapters import get_adapter

    key = (name, id(model), hashlib.sha1(str(ids).encode()).hexdigest())
    if key not in _REFERENCES:
        # Plain forward, outside any apply_press block: a nested position tracker would shift the positions.
        cache = DynamicCache()
        get_adapter(model).decoder(model)(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache)
        _REFERENCES[key] = [(layer.keys[0].float().cpu(), layer.values[0].float().cpu()) for layer in cache.layers]
        while len(_REFERENCES) > 2:
            _REFERENCES.popitem(last=False)
    return _REFERENCES[key]


def kept_per_layer(cache, reference, positions: list[int], values_only: bool = False,
                   exclude_last: int = 0) -> list[float]:
    """Fraction of ``positions`` (token indices of the reference) present in each layer of ``cache``,
    averaged over KV heads. An entry counts as position p's when p's reference vector is nearest to it and
    it is nearest to p's reference vector among all reference tokens (mutual nearest neighbour).
    ``exclude_last``: newest cache entries that are not in the reference (the tokens fed after it)."""
    out = []
    pos = torch.tensor(positions)
    for layer, (rk, rv) in zip(cache.layers, reference):
        k, v = layer.keys[0].float().cpu(), layer.values[0].float().cpu()
        if 0 < exclude_last < k.shape[1]:
            k, v = k[:, :-exclude_last], v[:, :-exclude_last]
        kept_vecs = v if values_only else torch.cat([k, v], -1)  # heads x n x d
        ref = rv if values_only else torch.cat([rk, rv], -1)  # heads x N x d
        target = ref[:, pos]  # heads x p x d
        nearest = torch.cdist(target, kept_vecs).argmin(-1)  # heads x p
        picked = torch.gather(kept_vecs, 1, nearest.unsqueeze(-1).expand(-1, -1, kept_vecs.shape[-1]))
        back = torch.cdist(picked, ref)  # heads x p x N
        own = back.gather(2, pos.view(1, -1, 1).expand(back.shape[0], -1, 1)).squeeze(-1)
        best = back.min(-1).values
        kept = own <= best * (1 + 1e-5) + 1e-6
        out.append(float(kept.float().mean()))
    return out


# --- answering --------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_with_press(model, press, compressed_ids: list[int], rest_ids: list[int], max_new_tokens: int,
                      on_first_token=None) -> dict:
    """Greedy answer of ``press`` (None: no compression): compress ``compressed_ids`` while prefilling, feed
    ``rest_ids`` (with the press active only if it compresses while decoding), decode. ``on_first_token(cache)``
    runs after the clock for the time to first token stops (the diagnostic)."""
    from transformers import DynamicCache

    from kvpress_ext.core.adapters import get_adapter
    from kvpress_ext.core.apply import apply_press, compression_phases
    from kvpress_ext.core.contract import prefill_chunk_size
    from kvpress_ext.runtime.pipeline import greedy_decode

    prefill, decoding = compression_phases(press)
    eos = _eos(model)
    cache = DynamicCache()
    decoder = get_adapter(model).decoder(model)
    context = torch.tensor([compressed_ids], device=model.device)
    step = max(1, (prefill_chunk_size(press) if prefill and press is not None else None) or context.shape[1])
    lc._sync(model)
    t0 = time.perf_counter()
    with apply_press(press if prefill else None, model):
        for start in range(0, context.shape[1], step):
            decoder(input_ids=context[:, start : start + step], past_key_values=cache)
    with apply_press(press if decoding else None, model):
        logits = model(input_ids=torch.tensor([rest_ids], device=model.device), past_key_values=cache,
                       logits_to_keep=1).logits
        first = int(logits[0, -1].argmax())
        lc._sync(model)
        t1 = time.perf_counter()
        extra = {"cache_tokens": int(cache.get_seq_length())}
        if on_first_token is not None:
            extra.update(on_first_token(cache))
        t2 = time.perf_counter()
        out = [first]
        if max_new_tokens > 1 and first not in eos:
            out += greedy_decode(model, torch.tensor([[first]], device=model.device), cache, max_new_tokens - 1, eos)
        lc._sync(model)
        t3 = time.perf_counter()
    steps = len(out) - 1
    return {"ids": out, "ttft_s": t1 - t0, "tpot_s": (t3 - t2) / steps if steps else None, **extra}


def _retry_other_attention(model, fn):
    """Run ``fn()``; a press that rejects the attention implementation (needs eager weights, or refuses them)
    is retried once with the other one. Returns (result, implementation used or None)."""
    try:
        return fn(), None
    except AssertionError as exc:
        current = model.config._attn_implementation
        text = str(exc).lower()
        if current not in ("eager", "sdpa") or not ("attention" in text or "eager" in text):
            raise
        other = "sdpa" if current == "eager" else "eager"
        model.set_attn_implementation(other)
        try:
            return fn(), other
        finally:
            model.set_attn_implementation(current)


_STORES: dict = {}


def _a3_answer(model, tokenizer, params: dict, sample: lc.Sample, parts) -> dict:
    from kvpress_ext.presses.a3 import ChunkStore
    from kvpress_ext.runtime.hub import explain_press_failures

    strategy, evict = a3_parts(params["method"])
    head = _ids(tokenizer, parts.compressed[: parts.context_start])
    prefix = head if head else None
    key = (params["model"], tuple(head), strategy == "surprisal_chunk")
    if key not in _STORES:
        root = tempfile.mkdtemp(prefix="longcontext-a3-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)  # chunk caches live as long as the process
        _STORES[key] = ChunkStore(root, model, tokenizer, prefix_ids=prefix,
                                  save_surprisal=strategy == "surprisal_chunk")
    store = _STORES[key]
    documents = sample.meta.get("documents")
    if documents:  # one chunk per document: the chunk boundaries are the document boundaries
        chunks = lc.document_chunks(tokenizer, documents, parts.compressed[parts.context_start:])
    else:
        chunks = lc.chunk_context(tokenizer, parts.compressed[parts.context_start:], params["chunk_tokens"])
    question_ids = _ids(tokenizer, parts.rest)
    store.precompute(chunks)  # A3's offline step: not part of the time to first token
    ends = [len(store.prefix_ids) + sum(map(len, chunks[: i + 1])) - 1 for i in range(len(chunks))]
    method = lc.Method(params["method"], strategy, evict)
    with explain_press_failures(evict):  # an evict press needing hub files offline: one line
        r = lc.answer(model, method, store.prefix_ids, chunks, question_ids, params["max_new_tokens"], store=store,
                      rate=params["rate"] if strategy else 0.15,
                      evict_kwargs={"compression_ratio": params["compression_ratio"]} if evict else None,
                      sink_positions=ends + [ends[-1] + len(question_ids)])
    r["context_tokens"] = len(store.prefix_ids) + sum(map(len, chunks))
    r["n_chunks"] = len(chunks)
    r["prefix_tokens"] = len(store.prefix_ids)
    return r


def cell_prompt(tokenizer, params: dict):
    """(sample, prompt parts, compressed ids, ids after them) of a cell: what :func:`run_cell` feeds the model,
    and what :func:`check_lengths` measures before a grid starts."""
    sample = (needle_sample(tokenizer, params) if params["source"] == "needle" else file_sample(params))
    parts = split_prompt(tokenizer, sample.context, sample.question, sample.meta.get("answer_prefix", ""),
                         params["query_aware"], params.get("chat_template", True))
    compressed_ids, rest_ids = _ids(tokenizer, parts.compressed), _ids(tokenizer, parts.rest)
    if params.get("max_context_tokens") and len(compressed_ids) > params["max_context_tokens"]:
        half = params["max_context_tokens"] // 2  # LongBench keeps the head and the tail
        compressed_ids = compressed_ids[:half] + compressed_ids[-half:]
    return sample, parts, compressed_ids, rest_ids


def run_cell(params: dict) -> dict:
    """Answer one cell; the record holds the prediction, ``score`` and timings (and the diagnostic)."""
    from kvpress_ext.core.registry import press_info
    from kvpress_ext.evaluation.run_perplexity import build_press, check_ratio, press_params
    from kvpress_ext.runtime.hub import explain_press_failures

    method, ratio, query_aware = params["method"], params.get("compression_ratio"), params["query_aware"]
    reason = mode_error(method, query_aware)
    if reason:
        raise lc.InputError(reason)
    if ratio is not None:
        check_ratio(ratio)
    model, tokenizer = get_model(params["model"], params.get("attn_implementation"))
    sample, parts, compressed_ids, rest_ids = cell_prompt(tokenizer, params)
    limit = context_limit(model)
    total = len(compressed_ids) + len(rest_ids) + params["max_new_tokens"]
    if limit and total > limit:
        raise lc.InputError(f"the prompt and answer need {total} tokens but the model's context is {limit}: "
                            "use shorter --lengths (or --max_context_tokens)")
    record: dict = {"answers": sample.answers, "sample_id": sample.id, "compressed_tokens": len(compressed_ids),
                    "rest_tokens": len(rest_ids), "chat_template": parts.chat_template}
    if sample.meta.get("documents"):
        record.update(n_documents=len(sample.meta["documents"]), needle_document=sample.meta["needle_document"],
                      titles=sample.meta["titles"])
    if is_a3(method):
        r = _a3_answer(model, tokenizer, params, sample, parts)
    else:
        info = press_info(method)
        if info.requires:
            raise lc.InputError(f"{method} requires {info.requires}")
        press, used = build_press(method, ratio, {}, len(compressed_ids))
        record["press_params"] = press_params(press)
        record["ratio_used"] = used
        positions = None
        needles = sample.meta.get("needle_texts") or []
        if press is not None and needles and params.get("diagnostic", True):
            text = parts.compressed
            spans = [(text.index(n), text.index(n) + len(n)) for n in needles if n in text]
            positions = token_positions(tokenizer, text, spans) if spans else None
        record["needle_tokens"] = len(positions) if positions else None
        ref = reference_kv(model, compressed_ids, params["model"]) if positions else None

        def diagnose(cache):
            from kvpress_ext.core.positions import position_state

            if not positions:
                return {}
            values_only = position_state(cache).rotated
            kept = kept_per_layer(cache, ref, positions, values_only, exclude_last=len(rest_ids))
            return {"needle_kept": kept, "needle_kept_mean": sum(kept) / len(kept), "needle_match": (
                "values" if values_only else "keys+values")}

        with explain_press_failures(method):  # a press needing hub files offline: one line
            r, attn = _retry_other_attention(
                model, lambda: answer_with_press(model, press, compressed_ids, rest_ids, params["max_new_tokens"],
                                                 diagnose))
        if attn:
            record["attn_implementation_used"] = attn
        r["context_tokens"] = len(compressed_ids)
    prediction = str(tokenizer.decode(r.pop("ids"), skip_special_tokens=True))
    r.pop("question_logits", None)
    return {**record, **r, "prediction": prediction, "score": score(params, sample, prediction)}


# --- cells ------------------------------------------------------------------------------------------------
def _fmt_ratio(r):
    return "-" if r is None else f"{r:g}"


def build_cells(samples: list[dict], methods: list[str], ratios: list[float], modes: list[bool], rates: list[float],
                settings: dict) -> list[Cell]:
    """Sample-major cells (so the cells of one sample run together): for every sample, mode, method, ratio.
    ``no_press`` / ``prefill`` / a plain ``a3-*`` have no ratio (A3 methods one cell per rate)."""
    cells = []
    for sample in samples:
        skey = "|".join(f"{k}={sample[k]}" for k in sorted(sample) if k in ("length", "depth", "key_index", "index"))
        for query_aware in modes:
            for method in methods:
                strategy, evict = a3_parts(method) if is_a3(method) else (None, None)
                method_ratios = ratios if (not is_a3(method) and method != "no_press") or evict else [None]
                if method == "no_press":
                    method_ratios = [0.0]
                method_rates = rates if is_a3(method) and strategy else [None]
                for ratio in method_ratios:
                    for rate in method_rates:
                        key = _cell_file_key(f"{method}|ratio={_fmt_ratio(ratio)}|rate={_fmt_ratio(rate)}|"
                                             f"{'aware' if query_aware else 'agnostic'}|{skey}")
                        cells.append(Cell(key, {**settings, **sample, "method": method, "compression_ratio": ratio,
                                                "rate": rate, "query_aware": query_aware}))
    return cells


# --- summaries --------------------------------------------------------------------------------------------
GROUP = ("method", "compression_ratio", "rate", "query_aware", "length", "depth")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> list[dict]:
    """One record per method x ratio x rate x mode x length x depth: mean score over the samples, n, failures."""
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in GROUP)].append(r)
    out = []
    for key, recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        kept = [r["needle_kept"] for r in ok if r.get("needle_kept")]
        out.append({**dict(zip(GROUP, key)), "score": _mean([r["score"] for r in ok]), "n": len(ok),
                    "n_failed": len(recs) - len(ok), "ttft_s": _mean([r["ttft_s"] for r in ok]),
                    "tpot_s": _mean([r.get("tpot_s") for r in ok]), "cache_tokens": _mean([r.get("cache_tokens")
                                                                                           for r in ok]),
                    "context_tokens": _mean([r.get("context_tokens") for r in ok]),
                    "needle_kept_mean": _mean([r.get("needle_kept_mean") for r in ok]),
                    "needle_kept_per_layer": [sum(col) / len(col) for col in zip(*kept)] if kept else None,
                    "errors": sorted({r["error"] for r in recs if r["status"] != "ok"})})
    return out


def _accuracy(records, **where) -> tuple[float | None, int]:
    xs = [r["score"] for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in where.items())]
    return (sum(xs) / len(xs) if xs else None), len(xs)


def _sample(r: dict) -> tuple:
    """What identifies a record's sample (its haystack, needle and key), whatever the method."""
    return tuple(r.get(k) for k in ("length", "depth", "key_index", "index", "sample_id"))


def safe_ratios(records: list[dict], fraction: float = 0.9) -> list[dict]:
    """Per press, length and mode: the largest ratio whose accuracy (over depths and keys) is at least
    ``fraction`` x no press's in the same mode and length (None if no ratio is), with the accuracies.
    Paired: each ratio is judged against no press on the samples that ratio ran, so a grid cut short (one press
    with fewer samples than no press) compares like with like."""
    out = []
    presses = sorted({r["method"] for r in records if not is_a3(r["method"]) and r["method"] != "no_press"})
    for length in sorted({r.get("length") for r in records}, key=lambda x: (x is None, x)):
        for qa in sorted({r["query_aware"] for r in records}):
            base_records = [r for r in records if r["method"] == "no_press" and r.get("length") == length
                            and r["query_aware"] == qa and r["status"] == "ok"]
            base, _ = _accuracy(base_records)
            for m in presses:
                ratios = sorted({r["compression_ratio"] for r in records if r["method"] == m
                                 and r.get("length") == length and r["query_aware"] == qa
                                 and r["compression_ratio"] is not None})
                accs, safe = {}, []
                for x in ratios:
                    mine = [r for r in records if r["method"] == m and r.get("length") == length
                            and r["query_aware"] == qa and r["compression_ratio"] == x and r["status"] == "ok"]
                    accs[x] = _accuracy(mine)[0]
                    samples = {_sample(r) for r in mine}
                    paired = _accuracy([r for r in base_records if _sample(r) in samples])[0]
                    if accs[x] is not None and paired is not None and accs[x] >= fraction * paired:
                        safe.append(x)
                out.append({"method": m, "length": length, "query_aware": qa, "no_press": base,
                            "safe_ratio": max(safe) if safe else None, "accuracy": accs})
    return out


def _f(x, digits=2, scale=1.0):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _mode(qa):
    return "aware" if qa else "agnostic"


def summary_markdown(records: list[dict], title: str, command: str = "") -> str:
    ok = sum(r["status"] == "ok" for r in records)
    lines = [f"# {title}", "", f"`{command}`" if command else "", "",
             f"{len(records)} cells: {ok} ok, {len(records) - ok} failed. Scores are means over depths and keys.", ""]
    lengths = sorted({r.get("length") for r in records}, key=lambda x: (x is None, x))
    modes = sorted({r["query_aware"] for r in records})
    cols = [(n, qa) for n in lengths for qa in modes]
    header = "| " + " | ".join(f"{n} {_mode(qa)}" for n, qa in cols) + " |"
    presses = [r for r in records if not is_a3(r["method"])]
    if presses:
        safe = {(s["method"], s["length"], s["query_aware"]): s for s in safe_ratios(presses)}
        names = sorted({m for m, _, _ in safe})
        if names:
            lines += ["## Safe ratio (largest ratio with accuracy >= 90 % of no press, same length and mode)", "",
                      "| press " + header, "|---" * (1 + len(cols)) + "|"]
            base = {(n, qa): _accuracy(presses, method="no_press", length=n, query_aware=qa) for n, qa in cols}
            lines.append("| (no press accuracy) | " + " | ".join(
                f"{_f(a)} ({k})" if a is not None else "-" for a, k in (base[c] for c in cols)) + " |")
            for m in names:
                cells = []
                for n, qa in cols:
                    s = safe.get((m, n, qa))
                    if s is None:
                        cells.append("-")
                    elif not s["no_press"]:
                        cells.append("n/a (no press 0)")
                    else:
                        cells.append(_f(s["safe_ratio"]) if s["safe_ratio"] is not None else "none")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["## Accuracy", "", "| press | ratio " + header, "|---" * (2 + len(cols)) + "|"]
        for m, ratio in sorted({(r["method"], r["compression_ratio"]) for r in presses},
                               key=lambda t: (t[0] != "no_press", t[0], t[1] or 0)):
            accs = [_accuracy(presses, method=m, compression_ratio=ratio, length=n, query_aware=qa) for n, qa in cols]
            lines.append(f"| {m} | {_fmt_ratio(ratio)} | " + " | ".join(
                f"{_f(a)} ({k})" if a is not None else "-" for a, k in accs) + " |")
        lines += ["", ("## Needle kept (fraction of the needle's tokens in the cache at the first answer token; "
                       "mean over layers and samples / lowest layer)"), "",
                  "| press | ratio " + header, "|---" * (2 + len(cols)) + "|"]
        for m, ratio in sorted({(r["method"], r["compression_ratio"]) for r in presses if r["method"] != "no_press"}):
            row = []
            for n, qa in cols:
                recs = [r for r in presses if r["method"] == m and r["compression_ratio"] == ratio
                        and r.get("length") == n and r["query_aware"] == qa and r.get("needle_kept")]
                if not recs:
                    row.append("-")
                    continue
                per_layer = [sum(c) / len(c) for c in zip(*[r["needle_kept"] for r in recs])]
                row.append(f"{sum(per_layer) / len(per_layer):.2f} / {min(per_layer):.2f}")
            lines.append(f"| {m} | {_fmt_ratio(ratio)} | " + " | ".join(row) + " |")
        lines += ["", ("## Misses explained (answers scored below 1: needle mostly evicted, i.e. under half of its "
                       "tokens kept on average over layers, or kept and still missed)"), "",
                  "| press | ratio " + header, "|---" * (2 + len(cols)) + "|"]
        for m, ratio in sorted({(r["method"], r["compression_ratio"]) for r in presses if r["method"] != "no_press"}):
            row = []
            for n, qa in cols:
                missed = [r for r in presses if r["method"] == m and r["compression_ratio"] == ratio
                          and r.get("length") == n and r["query_aware"] == qa and r["status"] == "ok"
                          and r["score"] < 1 and r.get("needle_kept_mean") is not None]
                evicted = sum(r["needle_kept_mean"] < 0.5 for r in missed)
                row.append(f"{evicted} evicted, {len(missed) - evicted} kept" if missed else "-")
            lines.append(f"| {m} | {_fmt_ratio(ratio)} | " + " | ".join(row) + " |")
        lines.append("")
    fused = [r for r in records if is_a3(r["method"]) and r["status"] == "ok"]
    if fused:
        lines += ["## A3 fusion against a full prefill of the same chunks (question-agnostic)", "",
                  "| method | rate | ratio | length | n | accuracy | TTFT (ms) | TTFT / prefill |", "|---" * 8 + "|"]
        for m, rate, ratio, n in sorted({(r["method"], r["rate"], r["compression_ratio"], r.get("length"))
                                         for r in fused}, key=lambda t: (t[0] != PREFILL, t[0], t[1] or 0,
                                                                         t[2] or 0, t[3] or 0)):
            recs = [r for r in fused if (r["method"], r["rate"], r["compression_ratio"], r.get("length"))
                    == (m, rate, ratio, n)]
            base = _mean([r["ttft_s"] for r in fused if r["method"] == PREFILL and r.get("length") == n])
            ttft = _mean([r["ttft_s"] for r in recs])
            lines.append(f"| {m} | {_fmt_ratio(rate)} | {_fmt_ratio(ratio)} | {n} | {len(recs)} | "
                         f"{_f(_mean([r['score'] for r in recs]))} | {_f(ttft, 1, 1e3)} | "
                         f"{_f(ttft / base if base and ttft else None)} |")
        lines.append("")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["## Failed cells", ""]
        reasons = defaultdict(list)
        for r in failed:
            reasons[(r["method"], r["error"])].append(r["key"])
        for (m, err), keys in sorted(reasons.items()):
            lines.append(f"- {m} ({len(keys)} cells): {err}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_heatmaps(records: list[dict], path_prefix) -> list[Path]:
    """Per mode, one PNG: a depth x length accuracy map per method and ratio, all on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvpress_ext.storage.safe_write import save_figure

    paths = []
    ok = [r for r in records if r["status"] == "ok" and r.get("depth") is not None]
    for qa in sorted({r["query_aware"] for r in ok}):
        recs = [r for r in ok if r["query_aware"] == qa]
        panels = sorted({(r["method"], r["compression_ratio"], r["rate"]) for r in recs},
                        key=lambda t: (t[0] != "no_press", t[0] != PREFILL, t[0], t[1] or 0, t[2] or 0))
        depths = sorted({r["depth"] for r in recs})
        lengths = sorted({r["length"] for r in recs})
        ncol = min(6, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(1.2 + (0.6 + 0.5 * len(lengths)) * ncol,
                                                      (0.9 + 0.3 * len(depths)) * nrow), squeeze=False)
        im = None
        for ax, (m, ratio, rate) in zip(axes.flat, panels):
            grid = [[_accuracy(recs, method=m, compression_ratio=ratio, rate=rate, depth=d, length=n)[0]
                     for n in lengths] for d in depths]
            im = ax.imshow([[float("nan") if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                           cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            label = m + (f" r={ratio:g}" if ratio else "") + (f" rate={rate:g}" if rate is not None else "")
            ax.set_title(label, fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        if im is not None:
            fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (x: tokens, y: depth)")
        path = Path(f"{path_prefix}_{_mode(qa)}.png")
        save_figure(fig, path, flag="--output_dir", dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(records: list[dict], out_dir, title: str, command: str = "") -> dict:
    """``summary.json`` (aggregated records), ``summary.md`` and ``heatmap_<mode>.png`` in ``out_dir``."""
    from kvpress_ext.storage.safe_write import claim_output_dir, write_output

    out_dir = claim_output_dir(out_dir)
    summary = summarize(records)
    write_output(out_dir / "summary.json", json.dumps(summary, indent=1), flag="--output_dir")
    markdown = summary_markdown(records, title, command)
    write_output(out_dir / "summary.md", markdown, kind="markdown", flag="--output_dir")
    pngs = plot_heatmaps(records, out_dir / "heatmap") if any(r.get("depth") is not None for r in records) else []
    return {"summary": summary, "markdown": markdown, "heatmaps": [str(p) for p in pngs]}


# --- command line -----------------------------------------------------------------------------------------
def add_grid_arguments(ap, name: str) -> None:
    """Options shared by needle.py, ruler.py and longbench.py."""
    from kvpress_ext.cli.common import add_model_argument, add_sweep_args, add_threads_argument

    add_model_argument(ap)  # --model (short name, directory, hub id) and --no_chat_template
    ap.add_argument("--press", nargs="+", default=["no_press"],
                    help="registered presses (or all); no_press is always added as the baseline")
    ap.add_argument("--compression_ratio", type=float, nargs="+", default=[0.5],
                    help="ratios in [0, 1) for every press (budget presses keep 1 - ratio of the context)")
    ap.add_argument("--query_aware", action="store_true",
                    help="the question is part of the compressed context (kvpress's evaluation); default: "
                         "the context is compressed before the question is seen")
    ap.add_argument("--both_modes", action="store_true", help="run question-agnostic and question-aware")
    ap.add_argument("--strategies", nargs="*", default=[], help="A3 fusion strategies (adds the prefill baseline)")
    ap.add_argument("--rate", type=float, nargs="+", default=[0.15], help="A3: fractions of tokens recomputed")
    ap.add_argument("--evict", default=None, help="A3: press evicting from the fused cache (at each ratio)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="most answer tokens (default: by task)")
    ap.add_argument("--chunk_tokens", type=int, default=None,
                    help="A3 chunk size (default 128; needle.py --task multidoc: 512, the size of each document)")
    ap.add_argument("--max_context_tokens", type=int, default=None, help="cut the middle of longer contexts")
    ap.add_argument("--attn_implementation", default=None, help="eager / sdpa (default: the model's)")
    ap.add_argument("--no_diagnostic", action="store_true", help="skip the needle-kept diagnostic")
    ap.add_argument("--retry_failed", action="store_true",
                    help="rerun the cells recorded as failed (default: they are kept; finished cells are skipped)")
    ap.add_argument("--summary_only", action="store_true", help="rebuild the summaries from the cells on disk")
    ap.add_argument("--quick", action="store_true", help="a tiny grid for tests (under a minute)")
    ap.add_argument("--output_dir", default=None, help=f"default results/{name}")
    add_threads_argument(ap)
    ap.add_argument("--no_progress", action="store_true", help="hide the progress bar and per-cell lines")
    add_sweep_args(ap)


def methods_from_args(args) -> list[str]:
    from kvpress_ext.core.registry import press_info
    from kvpress_ext.presses.a3.press import STRATEGIES

    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        raise lc.InputError(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    if args.evict is not None:
        try:
            press_info(args.evict)
        except Exception as e:  # noqa: BLE001
            raise lc.InputError(str(e).splitlines()[0]) from None
    methods = expand_presses(args.press)
    if args.strategies:
        methods += [PREFILL] + [f"{A3_PREFIX}{s}" for s in args.strategies]
        if args.evict:
            methods += [f"{A3_PREFIX}{s}+{args.evict}" for s in args.strategies]
    return methods


def check_args(args) -> tuple[list[str], list[bool]]:
    """Methods and modes, or an :class:`~kvpress_ext.evaluation.longcontext.InputError` naming the fix."""
    for r in args.compression_ratio:
        if not 0 <= r < 1:
            raise lc.InputError(f"--compression_ratio {r} is out of range: use ratios in [0, 1)")
    for r in args.rate:
        if not 0 <= r <= 1:
            raise lc.InputError(f"--rate {r} is out of range: use rates in [0, 1]")
    for flag in ("max_new_tokens", "chunk_tokens", "max_context_tokens", "max_samples"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise lc.InputError(f"--{flag} must be a positive integer")
    methods = methods_from_args(args)
    if args.output_dir is not None:  # a directory we may not write into: one line before any model work
        from kvpress_ext.storage.safe_write import check_output_dir

        check_output_dir(args.output_dir)
    from kvpress_ext.cli.common import sweep_options_from_args
    from kvpress_ext.evaluation.sweep import check_options

    check_options(sweep_options_from_args(args))
    modes = [False, True] if args.both_modes else [bool(args.query_aware)]
    if not any(mode_error(m, qa) is None for m in methods for qa in modes if m != "no_press" or len(methods) == 1):
        raise lc.InputError(mode_error(methods[-1], modes[-1]))
    return methods, modes


def check_lengths(model, tokenizer, samples: list[dict], settings: dict, modes: list[bool]) -> None:
    """Lengths the model cannot hold: one line naming the longest that fits.

    Measured on the real prompt of every sample in every mode (chat template, haystack, needle, question, answer
    prefix) plus ``max_new_tokens``, as :func:`run_cell` builds it, so a grid never starts cells that can only
    fail."""
    limit = context_limit(model)
    if not limit:
        return

    def needed(n: int, group: list[dict]) -> int:  # the most tokens any sample of ``group`` needs at length n
        return max(len(c) + len(r) + settings["max_new_tokens"]
                   for sample in group for query_aware in modes
                   for _, _, c, r in [cell_prompt(tokenizer, {**settings, **sample, "length": n,
                                                               "query_aware": query_aware})])

    by_length: dict[int, list[dict]] = {}
    for sample in samples:
        by_length.setdefault(sample["length"], []).append(sample)
    too_long = [n for n, group in by_length.items() if needed(n, group) > limit]
    if too_long:
        group = by_length[min(too_long)]
        worst = [max(group, key=lambda sample: needed(min(too_long), [sample]))]
        lo, hi = 16, min(too_long) - 1  # the longest length at which the longest prompt fits (bisection) ...
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if needed(mid, worst) <= limit else (lo, mid - 1)
        while lo > 16 and needed(lo, group) > limit:  # ... and then every sample does
            lo -= 1
        raise lc.InputError(f"--lengths {' '.join(map(str, too_long))} exceed the model's context of {limit} tokens "
                            f"(with the prompt around the text, the question and the answer): use lengths up to {lo}")


def settings_from_args(args, max_new_tokens: int) -> dict:
    return {"model": args.model, "max_new_tokens": max_new_tokens, "chunk_tokens": args.chunk_tokens or 128,
            "max_context_tokens": args.max_context_tokens, "attn_implementation": args.attn_implementation,
            "chat_template": args.use_chat_template, "diagnostic": not args.no_diagnostic}


def run_cells(cells: list[Cell], run_cell_fn, out_dir, retry_failed: bool = False, progress: bool = True,
              compute: bool = True, options=None) -> list[dict]:
    """Run the cells not finished in ``out_dir`` with :func:`kvpress_ext.evaluation.sweep.run_sweep` (local or Ray, retries,
    one file per cell) and return every cell's flat record (params, status, error, the cell's result) in cell
    order. A cell recorded as failed is kept unless ``retry_failed`` (its reason is in the summary);
    ``compute=False`` only collects the cells already on disk (to rebuild summaries)."""
    from kvpress_ext.evaluation.sweep import SweepOptions, cell_identity, load_cells, run_sweep

    options = options or SweepOptions(progress=progress)
    on_disk = {d.get("key"): d for d in load_cells(out_dir)} if Path(out_dir).is_dir() else {}

    def kept(cell: Cell) -> dict | None:
        d = on_disk.get(cell.key)
        if d is None or cell_identity(d.get("params") or {}) != cell_identity(cell.params):
            return None
        return d if d.get("status") == "ok" or not (retry_failed and compute) else None

    done = {c.key: d for c in cells if (d := kept(c)) is not None}
    todo = [c for c in cells if c.key not in done] if compute else []
    computed = {}
    if todo:
        def report(cell, data, skipped):
            if skipped or not progress:
                return
            status = "ok" if data["status"] == "ok" else f"FAILED ({data['error']})"
            score = (data.get("record") or {}).get("score")
            print(f"{cell.key}: {status} score={score} {data.get('wall_s') or 0:.1f}s", file=sys.stderr)

        computed = run_sweep(todo, run_cell_fn, out_dir, options, desc="cells", on_result=report).cells
    if progress:
        print(f"{len(computed)} cells computed, {len(done)} reused", file=sys.stderr)
    records = []
    for cell in cells:
        d = computed.get(cell.key) or done.get(cell.key)
        if d is not None:
            records.append({"key": cell.key, **cell.params, **(d.get("record") or {}), "status": d["status"],
                            "error": d.get("error"), "cell_seconds": d.get("wall_s")})
    return records


def _cell_file_key(key: str) -> str:
    """A sweep key (filesystem-safe) from the readable ``method|ratio=..|..`` key."""
    return key.replace("|", "__")


def run_grid(args, name: str, samples: list[dict], methods: list[str], modes: list[bool], max_new_tokens: int):
    """Build the cells, run them resumably, write the summaries; returns (records, outputs)."""
    import shlex

    from kvpress_ext.cli.common import sweep_options_from_args
    from kvpress_ext.runtime.threads import set_threads

    set_threads(args.threads)
    out_dir = Path(args.output_dir or Path("results") / name)
    cells = build_cells(samples, methods, args.compression_ratio, modes, args.rate,
                        settings_from_args(args, max_new_tokens))
    if len(modes) > 1:  # --both_modes: A3 runs question-agnostic only (asked for explicitly, it fails as a cell)
        cells = [c for c in cells if mode_error(c.params["method"], c.params["query_aware"]) is None]
    records = run_cells(cells, run_cell, out_dir, retry_failed=args.retry_failed, progress=not args.no_progress,
                        compute=not args.summary_only, options=sweep_options_from_args(args))
    command = " ".join(shlex.quote(a) for a in sys.argv)
    outputs = write_outputs(records, out_dir, f"{name}: {args.model}", command)
    return records, outputs
