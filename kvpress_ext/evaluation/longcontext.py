"""Building blocks of the long-context evaluations (LongBench, Needle-in-a-haystack, RULER); the grid over
presses, ratios and modes that uses them is :mod:`kvpress_ext.evaluation.runners.longcontext`.

For A3, a sample's context is cut into chunks (paragraphs packed up to ``chunk_tokens`` tokens; longer
paragraphs are split), then answered by one of these *methods* (:func:`answer`):

* ``prefill``: a full prefill of ``prefix + chunks + question`` (the chunks' token ids concatenated, so it
  sees exactly the tokens the fusion sees), then greedy decoding;
* ``a3-<strategy>``: A3 / CacheBlend fusion of the separately precomputed chunk caches
  (:class:`kvpress_ext.presses.a3.A3Press`) at ``rate``, then greedy decoding from the fused cache;
* ``a3-<strategy>+<press>``: the same with eviction by a registered press after fusion (``evict=``).

With a chat template (unless ``--no_chat_template``) the prefix is the template's (system turn, user header) and
the question is asked as its suffix (blank line, question, assistant header), from
:func:`kvpress_ext.runtime.chat.split_chat_prompt`; without, the prefix is the BOS token and the question raw text.

Chunk caches are precomputed before the clock starts (A3 stores them offline), so a fusion's TTFT is
load + fuse + evict; the prefill's TTFT is its forward pass. TPOT is the mean time of the decoding
forwards after the first token.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.presses.a3 import A3Press
from kvpress_ext.runtime.pipeline import greedy_decode
from kvpress_ext.storage.inputs import read_json_file, read_text_file

PREFILL = "prefill"
A3_PREFIX = "a3-"


class InputError(KVPressExtError):
    """Bad input to a long-context evaluation: the commands print it on one line and exit with status 2."""


@dataclass
class Sample:
    """One question over one long context; ``answers`` are the accepted answers, ``meta`` goes to the JSON."""

    id: str
    context: str
    question: str
    answers: list[str]
    all_classes: list[str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    strategy: str | None = None  # None: full prefill
    evict: str | None = None


# --- inputs -----------------------------------------------------------------------------------------------
def read_records(path) -> list[dict]:
    """Records of a JSON list or a JSONL file."""
    records = read_json_file(path, "--data_file", "a JSON list or JSONL file of objects", jsonl=True, error=InputError)
    if not records or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path} holds no records; pass --data_file a JSON list or JSONL file of objects (one per line)")
    return records


def require_fields(records: list[dict], fields: tuple[str, ...], path) -> None:
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise InputError(f"{path}: record {i} lacks field(s) {', '.join(missing)}; every record needs "
                             f"{', '.join(fields)}")


# --- method names -----------------------------------------------------------------------------------------
def is_a3(method: str) -> bool:
    return method == PREFILL or method.startswith(A3_PREFIX)


def a3_parts(method: str) -> tuple[str | None, str | None]:
    """(strategy, evict press) of a fusion method name; (None, None) for ``prefill``."""
    if method == PREFILL:
        return None, None
    strategy, _, evict = method[len(A3_PREFIX):].partition("+")
    return strategy, evict or None


def mode_error(method: str, query_aware: bool, chunk: int | None = None) -> str | None:
    """Why ``method`` cannot run in this mode (with the context prefilled in chunks of ``chunk`` tokens), or None.

    Chunked prefill models a context streamed in before any question exists, so it is question-agnostic only;
    no_press and A3 have nothing to compress per chunk (A3 fuses its own chunk caches)."""
    if query_aware and is_a3(method):
        return (f"{method} fuses chunk caches stored before any question exists, so it has no question-aware mode: "
                "run it without --query_aware")
    if chunk and (is_a3(method) or method == "no_press"):
        return f"{method} is not prefilled in chunks: give --prefill_chunk_size to presses that compress"
    if chunk and query_aware:
        return CHUNKS_AGNOSTIC_ONLY
    return None


CHUNKS_AGNOSTIC_ONLY = ("--prefill_chunk_size streams the context in before the question exists, so it has no "
                        "question-aware mode: run it without --query_aware (or with --both_modes)")


# --- chunking ---------------------------------------------------------------------------------------------
def chunk_context(tokenizer, context: str, chunk_tokens: int) -> list[list[int]]:
    """Token-id chunks of ``context``: paragraphs (blank-line separated) packed greedily up to
    ``chunk_tokens`` tokens each; a paragraph longer than that is split at token boundaries."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", context) if p.strip()]
    chunks, current = [], []
    for p in paragraphs:
        ids = list(tokenizer(p + "\n\n", add_special_tokens=False)["input_ids"])
        while len(ids) > chunk_tokens:
            if current:
                chunks.append(current)
                current = []
            chunks.append(ids[:chunk_tokens])
            ids = ids[chunk_tokens:]
        if current and len(current) + len(ids) > chunk_tokens:
            chunks.append(current)
            current = []
        current = current + ids
    if current:
        chunks.append(current)
    return chunks


def truncate_middle(chunks: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """Drop whole chunks from the middle until at most ``max_tokens`` remain (LongBench keeps head and tail)."""
    if max_tokens is None:
        return chunks
    chunks = list(chunks)
    while len(chunks) > 1 and sum(map(len, chunks)) > max_tokens:
        chunks.pop(len(chunks) // 2)
    if sum(map(len, chunks)) > max_tokens:
        chunks = [chunks[0][:max_tokens]]
    return chunks


# --- one answer -------------------------------------------------------------------------------------------
def _sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def cache_sizes(model, cache) -> dict:
    """A cell's cache size: ``cache_tokens``, the first layer's length (what cells recorded first; on Gemma 3 a
    sliding-window layer no press touches), and ``compressed_cache_tokens`` / ``compressed_cache_tokens_max``, the
    mean and the largest length over the layers presses compress (the adapter's ``compressed_layers``: every
    layer on Llama-shaped models), which is what a ratio shrinks."""
    lengths = [int(cache.get_seq_length(i)) for i in get_adapter(model).compressed_layers(model)]
    return {"cache_tokens": int(cache.get_seq_length()), "compressed_cache_tokens": sum(lengths) / len(lengths),
            "compressed_cache_tokens_max": max(lengths)}


def answer(model, method: Method, bos: list[int], chunks: list[list[int]], question_ids: list[int],
           max_new_tokens: int, store=None, rate: float = 0.15, evict_kwargs: dict | None = None,
           sink_positions=None, selection_layer: int | None = None, keep_logits: bool = False) -> dict:
    """Greedy answer token ids of one method with ``ttft_s`` and ``tpot_s`` (None when one token).

    ``keep_logits=True`` also returns ``question_logits`` (n_question, vocab): the next-token logits at every
    question token, to compare a fusion's distributions with a full prefill's."""
    from transformers import DynamicCache


    extra = {}
    _sync(model)
    t0 = time.perf_counter()
    if method.strategy is None:
        cache = DynamicCache()
        ids = torch.tensor([bos + [t for c in chunks for t in c] + question_ids], device=model.device)
        with apply_press(None, model):
            all_logits = model(input_ids=ids, past_key_values=cache,
                               logits_to_keep=len(question_ids) if keep_logits else 1).logits[0]
    else:
        press = A3Press(strategy=method.strategy, rate=rate, store=store, evict=method.evict,
                        evict_kwargs=dict(evict_kwargs or {}) if method.evict else {},
                        sink_positions=sink_positions if method.strategy == "attnlink" else None,
                        selection_layer=selection_layer)
        result = press.fuse_result(model, chunks, question_ids)
        cache, all_logits = result.cache, result.logits
        extra = {"recomputed": int(result.selected.numel()), **cache_sizes(model, cache),
                 **{k: float(v) for k, v in result.timings.items()}}
    logits = all_logits[-1]
    first = int(logits.argmax())
    _sync(model)
    t1 = time.perf_counter()
    out = [first]
    if max_new_tokens > 1 and first not in eos_token_ids(model):
        with apply_press(None, model):
            out += greedy_decode(model, torch.tensor([[first]], device=model.device), cache, max_new_tokens - 1,
                                 eos_token_ids(model))
    _sync(model)
    t2 = time.perf_counter()
    steps = len(out) - 1
    if keep_logits:  # copied after the clock stops
        extra["question_logits"] = all_logits.float().cpu()
    return {"ids": out, "ttft_s": t1 - t0, "tpot_s": (t2 - t1) / steps if steps else None, **extra}


# --- haystacks (Needle, RULER niah) ---------------------------------------------------------------------------
def load_haystack(path) -> list[str]:
    """Sentences of a text file, or of the ``*.txt`` files of a folder (sorted by name), whitespace-normalised."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.txt")) if path.is_dir() else []
    if not files:
        raise InputError(f"no haystack text at {path}: pass --haystack_file FILE or --haystack_dir with *.txt files")

    flag = "--haystack_file" if path.is_file() else "--haystack_dir file"
    text = " ".join(" ".join(read_text_file(f, flag, "a UTF-8 text file").split()) for f in files)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    if not sentences:
        raise InputError(f"the haystack at {path} is empty: pass --haystack_file/--haystack_dir with some text")
    return sentences


def build_haystack(tokenizer, sentences: list[str], length: int, depth: float, needle: str,
                   sentences_per_paragraph: int = 5) -> tuple[str, int]:
    """A context of about ``length`` tokens (sentences from the start of the haystack, cycled) with
    ``needle`` inserted at the sentence boundary closest to ``depth`` (0 = start, 1 = end) of it.
    Returns the text (paragraphs of a few sentences) and the needle's sentence index."""
    text, where = build_haystack_multi(tokenizer, sentences, length, [(depth, needle)], sentences_per_paragraph)
    return text, where[0]


def build_haystack_multi(tokenizer, sentences: list[str], length: int, needles: list[tuple[float, str]],
                         sentences_per_paragraph: int = 5) -> tuple[str, list[int]]:
    """:func:`build_haystack` with several ``(depth, needle)`` pairs; returns the text and each needle's
    sentence index."""
    budget = length - sum(len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) for _, n in needles)
    picked, total, i = [], 0, 0
    lengths = {}
    while total < budget and i < 4 * len(sentences):  # sentences that overflow the budget are skipped
        s = sentences[i % len(sentences)]
        i += 1
        n = lengths.setdefault(s, len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]))
        if total + n > budget:
            continue
        picked.append(s)
        total += n
    cumulative, acc = [0], 0
    for s in picked:
        acc += lengths[s]
        cumulative.append(acc)
    slots = [min(range(len(cumulative)), key=lambda k: abs(cumulative[k] - d * total)) for d, _ in needles]
    # insert from the last slot backwards so earlier slots keep their meaning
    for j in sorted(range(len(needles)), key=lambda j: (slots[j], j), reverse=True):
        picked.insert(slots[j], needles[j][1])
    where = [picked.index(n) for _, n in needles]
    paragraphs = [" ".join(picked[k : k + sentences_per_paragraph])
                  for k in range(0, len(picked), sentences_per_paragraph)]
    return "\n\n".join(paragraphs), where


# --- multi-document contexts (Needle --task multidoc) ---------------------------------------------------------
DOCUMENT_HEADER = "Document [{index}] (Title: {title})\n"


def load_documents(path) -> list[tuple[str, str]]:
    """(title = file stem, whitespace-normalised text) of every non-empty ``*.txt`` file of a folder, by name."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--task multidoc needs a folder of documents, not {path}: pass --haystack_dir with *.txt "
                         "files (one document each)")
    docs = [(f.stem, " ".join(read_text_file(f, "--haystack_dir file", "a UTF-8 text file").split()))
            for f in sorted(path.glob("*.txt"))]
    docs = [(title, text) for title, text in docs if text]
    if not docs:
        raise InputError(f"no documents in {path}: pass --haystack_dir a folder with non-empty *.txt files")
    return docs


def n_documents(length: int, chunk_tokens: int) -> int:
    """Documents of a multi-document context of ``length`` tokens: one per ``chunk_tokens``."""
    return length // chunk_tokens


def check_documents(path, lengths: list[int], chunk_tokens: int) -> list[tuple[str, str]]:
    """The folder's documents long enough to fill a chunk (at least ``chunk_tokens`` words, so every document
    has about ``chunk_tokens`` tokens and a context about its length), or one line naming the fix when a length
    needs more of them than the folder has."""
    docs = load_documents(path)
    if min(lengths) < chunk_tokens:
        raise InputError(f"--lengths {min(lengths)} is shorter than one document of --chunk_tokens {chunk_tokens}: "
                         "use lengths of at least --chunk_tokens")
    docs = [(title, text) for title, text in docs if len(text.split()) >= chunk_tokens]
    need = n_documents(max(lengths), chunk_tokens)
    if need > len(docs):
        raise InputError(f"--lengths {max(lengths)} needs {need} documents of --chunk_tokens {chunk_tokens} but {path} "
                         f"has {len(docs)} *.txt files of at least {chunk_tokens} words: add files, use a smaller "
                         "--chunk_tokens or shorter --lengths")
    return docs


def _insert_middle(body: str, needle: str) -> str:
    """``needle`` at the sentence boundary nearest the middle of ``body`` (the middle word without one)."""
    cuts = [m.end() for m in re.finditer(r"(?<=[.!?])\s+", body)] or \
        [m.end() for m in re.finditer(r"\s+", body)] or [len(body)]
    cut = min(cuts, key=lambda c: abs(c - len(body) / 2))
    return (body[:cut].rstrip() + " " + needle + " " + body[cut:]).strip()


def build_document(tokenizer, index: int, title: str, text: str, chunk_tokens: int, needle: str | None = None) -> str:
    """``Document [index] (Title: title)`` and the longest start of ``text`` (whole words) such that the
    document, with ``needle`` in its middle if given and the blank line after it, fits ``chunk_tokens`` tokens."""
    header = DOCUMENT_HEADER.format(index=index, title=title)
    words = text.split()

    def make(k: int) -> str:
        body = " ".join(words[:k])
        return header + (_insert_middle(body, needle) if needle else body)

    def size(k: int) -> int:
        return len(tokenizer(make(k) + "\n\n", add_special_tokens=False)["input_ids"])

    if size(0) > chunk_tokens:
        raise InputError(f"--chunk_tokens {chunk_tokens} cannot hold a document's title and the needle "
                         f"({size(0)} tokens): use a larger --chunk_tokens")
    lo, hi = 0, min(len(words), 4 * chunk_tokens)  # lo always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= chunk_tokens:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def document_chunks(tokenizer, documents: list[str], text: str | None = None) -> list[list[int]]:
    """A3 chunks of a multi-document context: one per document (its tokens and the blank line between it and the
    next), so the chunk caches are per document as in CacheBlend / A3's retrieval-augmented setting. ``text``,
    the compressed part's context, is checked to be the documents joined by blank lines; whatever follows the
    last document in it goes into the last chunk, so the chunks hold exactly the tokens a press sees."""
    joined = "\n\n".join(documents)
    tail = ""
    if text is not None:
        if not text.startswith(joined) or text[len(joined):].strip():
            raise InputError("the multi-document context is not the documents joined by blank lines: report this "
                             "as a bug of kvpress_ext.evaluation.longcontext")
        tail = text[len(joined):]
    texts = [d + "\n\n" for d in documents[:-1]] + [documents[-1] + tail]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
