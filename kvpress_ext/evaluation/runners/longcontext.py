"""The long-context runner: every press (and A3 fusion) over needle / RULER / LongBench samples as a grid of cells.

One cell is one sample (:mod:`kvpress_ext.evaluation.tasks`: a haystack of ``length`` tokens with a needle at
``depth``, or one record of a data file) answered by one method at one compression ratio in one mode.
:func:`run_cell` answers a cell from its plain parameters (model from :mod:`kvpress_ext.evaluation.model_cache`);
:func:`run_cells` runs the grid resumably through :func:`kvpress_ext.evaluation.sweep.run_sweep` (local or Ray);
:func:`run_grid` builds the cells, runs them and hands the records to :mod:`kvpress_ext.evaluation.reports.longcontext`.

Methods:

* a registered press name (``no_press``, ``snapkv``, ``rkv``, ...): the prompt is split by
  :func:`kvpress_ext.evaluation.tasks.prompts.split_prompt`; the press compresses the first part while it is
  prefilled (in chunks for a press with ``prefill_chunk_size``), the rest is fed and the answer decoded greedily
  with the press still active if it compresses while decoding (as :class:`kvpress_ext.runtime.pipeline.KVPressExtPipeline`
  does). Budget presses get the budget that keeps ``1 - ratio`` of the compressed part
  (:func:`kvpress_ext.evaluation.press_setup.build_press`).
  A cell with ``prefill_chunk_size`` N (``--prefill_chunk_size``, its own mode in the cell key) feeds the
  compressed part in chunks of N tokens and compresses after each one
  (:func:`kvpress_ext.core.chunked_prefill.press_for_chunks`, token order kept), so the cache never holds more
  than the budget plus one chunk; question-agnostic only, and never for no_press or A3 (:func:`mode_error`).
* ``prefill`` / ``a3-<strategy>`` / ``a3-<strategy>+<press>``: the chunk-cache fusion comparison of
  :func:`kvpress_ext.evaluation.longcontext.answer` (question-agnostic only: the chunks are cached before any
  question exists).

Diagnostic (:mod:`kvpress_ext.evaluation.runners.needle_kept`): for a needle sample, the fraction of the needle's
tokens each compressed layer kept (averaged over KV heads; ``needle_kept_layers`` names the layers), on the cache
from which the first answer token is produced.

Cache size (:func:`kvpress_ext.evaluation.longcontext.cache_sizes`), on the same cache: ``cache_tokens`` is the
first layer's length, ``compressed_cache_tokens`` (mean) and ``compressed_cache_tokens_max`` are over the layers
the press compresses; they differ on Gemma 3, whose first layer is a sliding-window one no press touches.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import time

import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.chunked_prefill import check_prefill_chunk_size, press_for_chunks
from kvpress_ext.core.contract import compression_phases, prefill_chunk_size
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.registry import available_presses, press_info
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.longcontext import A3_PREFIX, PREFILL, a3_parts, is_a3, mode_error  # noqa: F401 - re-exported
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.press_setup import build_press, check_ratio, press_params
from kvpress_ext.evaluation.reports.longcontext import fmt_ratio, write_outputs
from kvpress_ext.evaluation.results import measured_date
from kvpress_ext.evaluation.runners.needle_kept import kept_per_layer, reference_kv, token_positions
from kvpress_ext.evaluation.sweep import Cell, SweepOptions, cell_path, recorded_cell, run_sweep
from kvpress_ext.evaluation.tasks.prompts import cell_prompt, context_limit, ids_of
from kvpress_ext.evaluation.tasks.records import score
from kvpress_ext.presses.a3 import ChunkStore
from kvpress_ext.runtime.hub import explain_press_failures
from kvpress_ext.runtime.models import retry_with_other_attention
from kvpress_ext.runtime.pipeline import greedy_decode


def expand_presses(names: list[str]) -> list[str]:
    """Press names with ``all`` expanded to every registered press (those that need a download stay in, and
    fail as cells with the reason); ``no_press`` first."""
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



# --- answering --------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_with_press(model, press, compressed_ids: list[int], rest_ids: list[int], max_new_tokens: int,
                      on_first_token=None, chunk: int | None = None) -> dict:
    """Greedy answer of ``press`` (None: no compression): compress ``compressed_ids`` while prefilling (in chunks
    of ``chunk`` tokens, compressing after each, when given), feed ``rest_ids`` (with the press active only if it
    compresses while decoding), decode. ``on_first_token(cache)`` runs after the clock for the time to first token
    stops (the diagnostic)."""
    prefill, decoding = compression_phases(press)
    eos = eos_token_ids(model)
    cache = DynamicCache()
    decoder = get_adapter(model).decoder(model)
    context = torch.tensor([compressed_ids], device=model.device)
    step = max(1, chunk or (prefill_chunk_size(press) if prefill and press is not None else None)
               or context.shape[1])
    lc._sync(model)
    t0 = time.perf_counter()
    with apply_press(press_for_chunks(press, chunk) if prefill else None, model):
        for start in range(0, context.shape[1], step):
            decoder(input_ids=context[:, start : start + step], past_key_values=cache)
    with apply_press(press if decoding else None, model):
        logits = model(input_ids=torch.tensor([rest_ids], device=model.device), past_key_values=cache,
                       logits_to_keep=1).logits
        first = int(logits[0, -1].argmax())
        lc._sync(model)
        t1 = time.perf_counter()
        extra = lc.cache_sizes(model, cache)
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


_STORES: dict = {}


def _a3_answer(model, tokenizer, params: dict, sample: lc.Sample, parts) -> dict:
    strategy, evict = a3_parts(params["method"])
    head = ids_of(tokenizer, parts.compressed[: parts.context_start])
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
    question_ids = ids_of(tokenizer, parts.rest)
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



def run_cell(params: dict) -> dict:
    """Answer one cell; the record holds the prediction, ``score`` and timings (and the diagnostic)."""
    method, ratio, query_aware = params["method"], params.get("compression_ratio"), params["query_aware"]
    chunk = params.get("prefill_chunk_size")  # absent: one-shot prefill (the keys of older cells unchanged)
    reason = mode_error(method, query_aware, chunk)
    if reason:
        raise lc.InputError(reason)
    if ratio is not None:
        check_ratio(ratio)
    model, tokenizer = get_model(params["model"], attn_implementation=params.get("attn_implementation"))
    sample, parts, compressed_ids, rest_ids = cell_prompt(tokenizer, params)
    limit = context_limit(model)
    total = len(compressed_ids) + len(rest_ids) + params["max_new_tokens"]
    if limit and total > limit:
        raise lc.InputError(f"the prompt and answer need {total} tokens but the model's context is {limit}: "
                            "use shorter --lengths (or --max_context_tokens)")
    check_prefill_chunk_size(chunk, len(compressed_ids))
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
        layers = get_adapter(model).compressed_layers(model)  # the layers a press may evict from

        def diagnose(cache):
            if not positions:
                return {}
            values_only = position_state(cache).rotated
            kept = kept_per_layer(cache, ref, positions, values_only, exclude_last=len(rest_ids), layers=layers)
            return {"needle_kept": kept, "needle_kept_mean": sum(kept) / len(kept), "needle_kept_layers": layers,
                    "needle_match": "values" if values_only else "keys+values"}

        with explain_press_failures(method):  # a press needing hub files offline: one line
            r, retry = retry_with_other_attention(
                model, lambda: answer_with_press(model, press, compressed_ids, rest_ids, params["max_new_tokens"],
                                                 diagnose, chunk=chunk))
        if retry is not None:
            record["attn_implementation_used"] = retry.kernel
        r["context_tokens"] = len(compressed_ids)
    prediction = str(tokenizer.decode(r.pop("ids"), skip_special_tokens=True))
    r.pop("question_logits", None)
    return {**record, **r, "prediction": prediction, "score": score(params, sample, prediction)}


def build_cells(samples: list[dict], methods: list[str], ratios: list[float], modes: list[bool], rates: list[float],
                settings: dict, chunks=()) -> list[Cell]:
    """Sample-major cells (so the cells of one sample run together): for every sample, mode, method, ratio.
    ``no_press`` / ``prefill`` / a plain ``a3-*`` have no ratio (A3 methods one cell per rate). Each of
    ``chunks`` (prefill chunk sizes) adds a cell per press and ratio, its own mode in the key (``|chunk=N``);
    one-shot cells keep the keys and params they had before chunks existed, so their files are reused."""
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
                        params = {**settings, **sample, "method": method, "compression_ratio": ratio, "rate": rate,
                                  "query_aware": query_aware}
                        head = (f"{method}|ratio={fmt_ratio(ratio)}|rate={fmt_ratio(rate)}|"
                                f"{'aware' if query_aware else 'agnostic'}")
                        cells.append(Cell(_cell_file_key(f"{head}|{skey}"), params))
                        cells += [Cell(_cell_file_key(f"{head}|chunk={c}|{skey}"), {**params, "prefill_chunk_size": c})
                                  for c in chunks if mode_error(method, query_aware, c) is None]
    return cells




def run_cells(cells: list[Cell], run_cell_fn, out_dir, retry_failed: bool = False, progress: bool = True,
              compute: bool = True, options=None, reused: set | None = None) -> list[dict]:
    """Run the cells not finished in ``out_dir`` with :func:`kvpress_ext.evaluation.sweep.run_sweep` (local or Ray, retries,
    one file per cell) and return every cell's flat record (params, status, error, the cell's result, ``measured``:
    the date its file was written) in cell order. A cell recorded as failed is kept unless ``retry_failed`` (its
    reason is in the summary); ``compute=False`` only collects the cells already on disk (to rebuild summaries).
    The keys of the cells taken from an earlier run are added to ``reused``."""
    options = options or SweepOptions(progress=progress)

    def kept(cell: Cell) -> dict | None:
        d = recorded_cell(out_dir, cell)
        if d is None:
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
    if reused is not None:
        reused.update(k for k in done if k not in computed)
    records = []
    for cell in cells:
        d = computed.get(cell.key) or done.get(cell.key)
        if d is not None:
            records.append({"key": cell.key, **cell.params, **(d.get("record") or {}), "status": d["status"],
                            "error": d.get("error"), "cell_seconds": d.get("wall_s"),
                            "measured": measured_date(cell_path(out_dir, cell.key, cell.params))})
    return records


def _cell_file_key(key: str) -> str:
    """A sweep key (filesystem-safe) from the readable ``method|ratio=..|..`` key."""
    return key.replace("|", "__")


def run_grid(name: str, samples: list[dict], methods: list[str], modes: list[bool], settings: dict,
             ratios: list[float], rates: list[float], out_dir, options: SweepOptions, retry_failed: bool = False,
             compute: bool = True, command: str = "", chunks=()):
    """Build the cells (``chunks``: prefill chunk sizes, each a mode beside one-shot), run them resumably, write
    the summaries; returns (records, outputs of :func:`kvpress_ext.evaluation.reports.longcontext.write_outputs`)."""
    cells = build_cells(samples, methods, ratios, modes, rates, settings, chunks)
    if len(modes) > 1:  # both modes: A3 runs question-agnostic only (asked for explicitly, it fails as a cell)
        cells = [c for c in cells if mode_error(c.params["method"], c.params["query_aware"]) is None]
    reused: set = set()
    records = run_cells(cells, run_cell, out_dir, retry_failed=retry_failed, progress=options.progress,
                        compute=compute, options=options, reused=reused)
    outputs = write_outputs(records, out_dir, f"{name}: {settings['model']}", command, reused=reused)
    return records, outputs
