"""``kvpress-ext a3 {precompute,ask}``: A³ / CacheBlend fusion from the command line.

``precompute`` encodes every chunk of a chunk file into a :class:`ChunkStore` (the offline step);
``ask`` fuses the stored chunks of the same file with a question and answers greedily from the fused
cache, optionally against a full prefill of the same tokens. Generation and timing reuse
:func:`kvpress_ext.evaluation.longcontext.answer`, so the numbers mean what they mean in the long-context
evaluations: TTFT is load + fuse + evict + the first token; the store is filled before the clock starts.

With a chat template (unless ``--no_chat_template``) the chunks are encoded after the template's prefix (system turn,
user header) and the question is asked as the template's suffix (blank line, question, assistant header), both from
:func:`kvpress_ext.runtime.chat.split_chat_prompt`; ``precompute`` and ``ask`` must agree on it (the prefix is part of every
stored chunk's key).

A chunk file is a JSON list or JSONL of strings or of ``{"text": ...}`` objects (each one chunk), or a
``.txt`` file cut into ``--chunk_tokens`` token slices of its token ids: the chunks concatenated are the
text's tokens, so ``ask`` and a full prefill of the text see the same sequence.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import time
from pathlib import Path

from kvpress_ext.cli.common import (
    add_model_argument,
    add_placement_args,
    add_threads_argument,
    placement_kwargs,
    set_threads,
)
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.core.registry import get_press
from kvpress_ext.evaluation.a3_quality import distribution_agreement
from kvpress_ext.evaluation.longcontext import PREFILL, Method, answer
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.runtime import hub
from kvpress_ext.runtime.chat import split_chat_prompt
from kvpress_ext.runtime.models import load_model
from kvpress_ext.runtime.threads import threads_text
from kvpress_ext.storage.chunk_files import A3InputError, check_chunk_file, load_chunks
from kvpress_ext.storage.chunk_store import SUMMARY, TENSORS, ReadOnlyStoreError, check_store_root
from kvpress_ext.storage.safe_write import check_output_file, write_output


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise A3InputError(f"--{flag} {value} must be a positive integer")
    return value


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = None
    if rate is None or not 0 <= rate <= 1:
        raise A3InputError(f"--rate {text!r} must be a number in [0, 1] (the fraction of document tokens recomputed)")
    return rate


def _evict_kwargs(items: list[str] | None) -> dict:
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise A3InputError(f"--evict_kwargs {item!r} must be key=value, e.g. compression_ratio=0.5")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _load_model(args):
    set_threads(args.threads)
    return load_model(args.model, **placement_kwargs(args))


def _prompt(tok, chunks, question: str, use_chat_template: bool):
    """The chat prompt around the chunks (:func:`kvpress_ext.runtime.chat.split_chat_prompt`); the separator before the
    question depends on how the last chunk ends."""
    last = tok.decode(chunks[-1]) if chunks else ""
    return split_chat_prompt(tok, last, question, use_chat_template=use_chat_template)


def _store(root, model, tokenizer, chunks=(), use_chat_template: bool = True, **kwargs):
    """The chunk store; with a chat template its prefix is the template's prefix (else the model's BOS)."""
    prompt = _prompt(tokenizer, list(chunks), "", use_chat_template)
    prefix_ids = prompt.ids(tokenizer)[0] if prompt.templated else None
    return ChunkStore(root, model, tokenizer, prefix_ids=prefix_ids, **kwargs)


def _cli_cache_error(e: CacheFormatError) -> A3InputError:
    """The store's reason, with its Python-only hint (``recompute_bad=True``, ``ChunkStore(...)``) replaced by the
    flag; for a store this process cannot write, the fix names a copy one may write instead."""
    if isinstance(e, ReadOnlyStoreError):
        return A3InputError(f"{e.reason}; the store {e.root} cannot be written here ({e.why}), so --recompute_bad "
                            "cannot repair it. Fix: copy it to a folder you may write and rerun `kvpress-ext a3 "
                            "precompute` with --store COPY plus --recompute_bad, or ask the store's owner to.")
    text = str(e).strip()
    clauses = [c for c in re.split(r";\s+", text.splitlines()[0] if text else "")
               if "ChunkStore(" not in c and "recompute_bad=True" not in c]
    reason = "; ".join(clauses).rstrip(". ") or type(e).__name__
    return A3InputError(f"{reason}. Fix: rerun `kvpress-ext a3 precompute` with the same --model, --chunks and "
                        "--store plus --recompute_bad.")


def _precompute_into(store, chunks, surprisal: bool, desc: str) -> tuple[int, float]:
    """Store every chunk (entries already there are reused); returns (number computed, seconds)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    computed = 0
    try:
        if store.prefix_ids:
            store.prefix()  # first, so each miss below is the chunk's own
        for ids in tqdm(chunks, desc=desc, unit="chunk"):
            before = store.misses
            store.get(ids, need_surprisal=surprisal)
            computed += store.misses > before
    except CacheFormatError as e:
        raise _cli_cache_error(e) from None
    return computed, time.perf_counter() - t0


# --- precompute -------------------------------------------------------------------------------------------
def _cmd_precompute(args) -> int:
    _positive(args.chunk_tokens, "chunk_tokens")
    check_chunk_file(args.chunks)
    check_store_root(args.store)
    model, tok = _load_model(args)
    chunks = load_chunks(args.chunks, tok, args.chunk_tokens)
    store = _store(args.store, model, tok, chunks, args.use_chat_template, save_surprisal=args.surprisal,
                   recompute_bad=args.recompute_bad)
    computed, seconds = _precompute_into(store, chunks, args.surprisal, "a3 precompute")
    summary = {
        "model": args.model, "chunks_file": str(Path(args.chunks).resolve()), "store": str(store.root.resolve()),
        "store_directory": str(store.directory.resolve()), "chunk_tokens": args.chunk_tokens, "surprisal": args.surprisal,
        "chunks": len(chunks), "tokens": sum(map(len, chunks)), "computed": computed,
        "reused": len(chunks) - computed, "seconds": seconds, "threads": torch_threads(),
        "chat_template": args.use_chat_template, "prefix_tokens": len(store.prefix_ids),
    }
    write_output(store.root / SUMMARY, json.dumps(summary, indent=1) + "\n", flag="--store")
    print(f"{summary['chunks']} chunks ({summary['tokens']} tokens): {computed} computed, {summary['reused']} "
          f"reused in {seconds:.2f} s ({_threads_text()}); summary in {store.root / SUMMARY}")
    return 0


# --- ask --------------------------------------------------------------------------------------------------
def _has_surprisal(store, ids) -> bool:
    from safetensors import safe_open


    try:
        with safe_open(str(store.chunk_path(ids) / TENSORS), "pt") as f:
            return "surprisal" in f.keys()  # noqa: SIM118 - safe_open has no __contains__
    except Exception:  # noqa: BLE001 - unreadable: let the store report it as corrupt
        return True


def _check_stored(store, chunks, args) -> None:
    """Fail with the command that fixes it when a chunk is not stored (unless --compute_missing)."""
    fix = (f"run `kvpress-ext a3 precompute --model {args.model} --chunks {args.chunks} --store {args.store}"
           f"{' --chunk_tokens ' + str(args.chunk_tokens) if Path(args.chunks).suffix.lower() == '.txt' else ''}"
           f"{' --surprisal' if args.strategy == 'surprisal_chunk' else ''}"
           f"{'' if args.use_chat_template else ' --no_chat_template'}` first, or pass --compute_missing")
    missing = [i for i, c in enumerate(chunks) if not store.contains(c)]
    if missing:
        raise A3InputError(f"{len(missing)} of {len(chunks)} chunks (first: chunk {missing[0]}) are not in the store "
                           f"{args.store} for this model; {fix}")
    if args.strategy == "surprisal_chunk":
        bare = [i for i, c in enumerate(chunks) if not _has_surprisal(store, c)]
        if bare:
            raise A3InputError(f"strategy surprisal_chunk needs stored surprisal, which {len(bare)} of {len(chunks)} "
                               f"chunks lack (first: chunk {bare[0]}); {fix}")


def _tokens_per_s(tpot_s):
    return 1.0 / tpot_s if tpot_s else None


def _validate_ask(args) -> tuple[float, dict]:
    rate = _rate(args.rate)
    kwargs = _evict_kwargs(args.evict_kwargs)
    if kwargs and args.evict is None:
        raise A3InputError("--evict_kwargs needs --evict NAME (the press they configure), e.g. --evict snapkv")
    _positive(args.max_new_tokens, "max_new_tokens")
    _positive(args.chunk_tokens, "chunk_tokens")
    if args.strategy == "attnlink":  # sinks are placed by the CLI; any non-empty list passes validation here
        A3Press(strategy=args.strategy, rate=rate, selection_layer=args.selection_layer, sink_positions=[0])
    else:
        A3Press(strategy=args.strategy, rate=rate, selection_layer=args.selection_layer)
    if args.evict is not None:
        get_press(args.evict, **kwargs)  # unknown press or parameter: one line naming the choices
    if not args.question.strip():
        raise A3InputError("--question is empty; pass the question text")
    check_chunk_file(args.chunks)
    check_store_root(args.store)
    if args.json:
        check_output_file(args.json)
    if not Path(args.store).is_dir() and not args.compute_missing:
        raise A3InputError(f"store directory not found: {args.store}; run `kvpress-ext a3 precompute --store "
                           f"{args.store} ...` first, or pass --compute_missing")
    return rate, kwargs


def _cmd_ask(args) -> int:
    import torch


    rate, evict_kwargs = _validate_ask(args)
    model, tok = _load_model(args)
    load_start = machine_load()
    chunks = load_chunks(args.chunks, tok, args.chunk_tokens)
    need_surprisal = args.strategy == "surprisal_chunk"
    store = _store(args.store, model, tok, chunks, args.use_chat_template,
                   save_surprisal=need_surprisal and args.compute_missing)
    computed, precompute_s = 0, 0.0
    if args.compute_missing:
        computed, precompute_s = _precompute_into(store, chunks, need_surprisal, "a3 compute missing")
    else:
        _check_stored(store, chunks, args)
    prompt = _prompt(tok, chunks, args.question, args.use_chat_template)
    q_ids = list(tok(prompt.suffix, add_special_tokens=False)["input_ids"])
    if not q_ids:
        raise A3InputError("--question has no tokens; pass the question text")
    bos = store.prefix_ids
    ends = [len(bos) + sum(map(len, chunks[: i + 1])) - 1 for i in range(len(chunks))]
    sinks = ends + [ends[-1] + len(q_ids)]
    with torch.no_grad():  # untimed warm-up: the first forward of a process pays one-off start-up costs
        model(input_ids=torch.tensor([bos + q_ids], device=input_device(model)))
    method = Method(f"a3-{args.strategy}", args.strategy, args.evict)
    try:
        with hub.explain_press_failures(args.evict):
            fused = answer(model, method, bos, chunks, q_ids, args.max_new_tokens, store=store, rate=rate,
                           evict_kwargs=evict_kwargs, sink_positions=sinks, selection_layer=args.selection_layer,
                           keep_logits=args.compare_full)
    except CacheFormatError as e:
        raise _cli_cache_error(e) from None
    fused_logits = fused.pop("question_logits", None)
    timings = {k: fused.get(k) for k in ("load_s", "realign_s", "fuse_s", "evict_s", "ttft_s", "tpot_s")}
    timings["decode_tokens_per_s"] = _tokens_per_s(fused["tpot_s"])
    result = {
        "model": args.model, "store": str(args.store), "chunks_file": str(args.chunks), "question": args.question,
        "chat_template": prompt.templated, "strategy": args.strategy, "rate": rate, "selection_layer": args.selection_layer, "evict": args.evict,
        "evict_kwargs": evict_kwargs, "max_new_tokens": args.max_new_tokens, "n_chunks": len(chunks),
        "context_tokens": sum(map(len, chunks)), "question_tokens": len(q_ids), "prefix_tokens": len(bos),
        "recomputed": fused["recomputed"], "cache_tokens": fused["cache_tokens"],
        "chunks_computed_now": computed, "precompute_s": precompute_s,
        "answer": str(tok.decode(fused["ids"], skip_special_tokens=True)), "answer_ids": fused["ids"],
        "timings": timings, "threads": torch_threads(), "load_start": load_start,
    }
    print(f"answer: {result['answer']}")
    print(f"{method.name} rate {rate}: recomputed {result['recomputed']}/{result['context_tokens']} document tokens; "
          f"load {_ms(timings['load_s'])}, fuse {_ms(timings['fuse_s'])}, TTFT {_ms(timings['ttft_s'])}, "
          f"decode {_rate_text(timings['decode_tokens_per_s'])} ({_threads_text()})")
    if args.compare_full:
        full = answer(model, Method(PREFILL), bos, chunks, q_ids, args.max_new_tokens, keep_logits=True)
        kl, top1 = distribution_agreement(full.pop("question_logits"), fused_logits)
        result["full"] = {"answer": str(tok.decode(full["ids"], skip_special_tokens=True)), "answer_ids": full["ids"],
                          "ttft_s": full["ttft_s"], "tpot_s": full["tpot_s"],
                          "decode_tokens_per_s": _tokens_per_s(full["tpot_s"])}
        result["comparison"] = {"ttft_ratio": timings["ttft_s"] / full["ttft_s"],
                                "answers_agree": full["ids"] == fused["ids"], "kl": kl, "top1": top1}
        cmp = result["comparison"]
        print(f"full prefill: TTFT {_ms(full['ttft_s'])} (fused/full {cmp['ttft_ratio']:.3f}), decode "
              f"{_rate_text(result['full']['decode_tokens_per_s'])}; answers {'agree' if cmp['answers_agree'] else 'differ'}"
              f"; KL(full||fused) {kl:.3g} nats, top-1 {top1:.3f} over {len(q_ids)} question tokens")
        if not cmp["answers_agree"]:
            print(f"full-prefill answer: {result['full']['answer']}")
    if args.json:
        result["load_end"] = machine_load()
        out = write_output(args.json, json.dumps(result, indent=1) + "\n")
        print(f"written to {out}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _threads_text() -> str:
    return threads_text(torch_threads())


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _rate_text(tokens_per_s) -> str:
    return "- (one token)" if tokens_per_s is None else f"{tokens_per_s:.1f} tok/s"


# --- parser -------------------------------------------------------------------------------------------------
def _cache_errors_name_the_flag(command):
    """Any corrupt-store error raised in ``command`` names ``--recompute_bad``, not the Python argument."""

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except CacheFormatError as e:
            raise _cli_cache_error(e) from None

    return run


def add_parser(subparsers) -> None:
    a3 = subparsers.add_parser("a3", help="A3 / CacheBlend fusion: precompute chunk caches, answer from them")
    sub = a3.add_subparsers(dest="a3_command", required=True)

    p = sub.add_parser("precompute", help="encode every chunk of a chunk file into a chunk store (reuses entries)")
    add_model_argument(p)
    p.add_argument("--chunks", required=True, help="JSON/JSONL list of strings or {text} objects, or a .txt file")
    p.add_argument("--store", required=True,
                   help="chunk store directory (created if absent; an existing directory must be a chunk store)")
    p.add_argument("--surprisal", action="store_true", help="also store per-token surprisal (surprisal_chunk)")
    p.add_argument("--recompute_bad", action="store_true", help="recompute corrupt or mismatched entries")
    p.add_argument("--chunk_tokens", type=int, default=512, help="tokens per chunk when --chunks is a .txt file")
    add_threads_argument(p)
    add_placement_args(p)
    p.set_defaults(func=_cache_errors_name_the_flag(_cmd_precompute))

    p = sub.add_parser("ask", help="fuse the stored chunks with a question and answer greedily")
    add_model_argument(p)
    p.add_argument("--store", required=True, help="the chunk store directory given to precompute")
    p.add_argument("--chunks", required=True, help="the chunk file given to precompute")
    p.add_argument("--chunk_tokens", type=int, default=512, help="as given to precompute, for a .txt file")
    p.add_argument("--question", required=True, help="text appended after the fused chunks and answered")
    p.add_argument("--strategy", default="debug", help="blend, debug, attnlink, full, cat, surprisal_chunk, random")
    p.add_argument("--rate", default="0.15", help="fraction of document tokens recomputed, in [0, 1]")
    p.add_argument("--selection_layer", type=int, default=None, help="default 1 for attention strategies, else 0")
    p.add_argument("--evict", default=None, help="registered press evicting from the fused cache, e.g. snapkv")
    p.add_argument("--evict_kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="parameters of --evict")
    p.add_argument("--max_new_tokens", type=int, default=64, help="most answer tokens (greedy)")
    p.add_argument("--compute_missing", action="store_true", help="compute chunks the store lacks (before timing)")
    p.add_argument("--compare_full", action="store_true", help="also answer with a full prefill and compare")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write everything to this JSON file (missing parent directories are created; an existing file "
                        "is replaced atomically only if it holds JSON)")
    add_threads_argument(p)
    add_placement_args(p)
    p.set_defaults(func=_cache_errors_name_the_flag(_cmd_ask))
