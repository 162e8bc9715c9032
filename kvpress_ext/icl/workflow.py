"""Compress-in-context: read worked examples into one bounded R-KV cache, save it, answer new questions from it.

``precompute`` feeds each document (question, solution, answer) to the model through an :class:`RKVPress`,
optionally has the model write bullet-point takeaways (``takeaways``) or rewrite one running note
(``notepad``) after each document, and saves the cache with :func:`kvpress_ext.storage.cache_files.save_cache`.
``evaluate`` samples answers from untouched copies of that cache; ``score`` turns them into pass@k.
``grid_cell`` is one (budget, mode, complexity) cell of ``kvpress-ext icl grid``: precompute, evaluate and score,
run through :mod:`kvpress_ext.evaluation.sweep` (locally or as a Ray task; its files go to the cell's directory, so a Ray
cluster needs a shared filesystem for ``--out_dir``).

With a chat template (:mod:`kvpress_ext.runtime.chat`) the cache is one long user turn: the template's prefix, then the
documents; a note is asked for as the user's instruction and written as the assistant's reply, after which a new
user turn continues; each question is asked as the template's suffix (blank line, problem, assistant header) and
the answer starts with ``Solution:``. The cache's metadata records whether the template was used, and ``evaluate``
follows it.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import CacheFormatError, KVPressExtError
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.icl.scoring import format_scores_table, score_generations, write_scores_csv
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.runtime.chat import chat_turn_break, has_chat_template, split_chat_prompt
from kvpress_ext.runtime.generate import sample_token
from kvpress_ext.runtime.models import load_model
from kvpress_ext.runtime.threads import set_threads
from kvpress_ext.storage.cache_files import (
    METADATA_FILE,
    check_cache_target,
    load_cache,
    press_from_description,
    read_metadata,
    save_cache,
)
from kvpress_ext.storage.inputs import load_json, read_text_file
from kvpress_ext.storage.safe_write import path_lock, recover, waiting_note, write_output

MODES = ("takeaways", "notepad", "none")
COMPLEXITIES = ("simple", "complex")
SENTINEL = "<END>"

_INSTRUCTIONS = {
    ("takeaways", "simple"): "List the key takeaways of the example above as short bullet points.",
    ("takeaways", "complex"): (
        "List the key takeaways of the example above as bullet points: the method used, why it works, "
        "the common mistakes to avoid and how to check the answer."
    ),
    ("notepad", "simple"): "Rewrite your running notes so they include what the example above teaches.",
    ("notepad", "complex"): (
        "Rewrite your running notes as one organised document: merge what the example above teaches with "
        "your previous notes, group methods by problem type, and keep checks and pitfalls."
    ),
}


class ICLInputError(KVPressExtError):
    """Bad workflow input (data file, budget, paths): reported in one line with exit status 2."""


def load_documents(path, limit: int | None = None, *, require_solution: bool = False, flag: str = "--data") -> list[dict]:
    """A JSON list of ``{"question", "solution", "answer"}`` objects, not empty (or an object holding it as
    ``records``: what ``icl cluster query`` writes). ``solution``/``answer`` may be missing for questions to
    answer (eval data), not for documents to read (``require_solution``)."""
    path = Path(path)
    text = read_text_file(path, flag, "a JSON list of question/solution/answer objects")
    try:
        data = load_json(text, f"{flag} {path}")
    except json.JSONDecodeError as exc:
        raise ICLInputError(f"Data file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); pass a JSON list of "
                            "question/solution/answer objects.") from exc
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        data = data["records"]
    if not isinstance(data, list) or not all(isinstance(d, dict) and "question" in d for d in data):
        raise ICLInputError(f"Data file {path} must hold a JSON list of objects with at least a 'question' field.")
    if not data:
        raise ICLInputError(f"Data file {path} holds an empty list; add at least one question/solution/answer object.")
    bad = [d for d in data if not isinstance(d["question"], str) or not d["question"].strip()]
    if bad:
        raise ICLInputError(f"Data file {path}: record {data.index(bad[0])} has an empty or non-text 'question'; fix it.")
    if require_solution:
        lacking = [i for i, d in enumerate(data) if not (d.get("solution") or d.get("answer"))]
        if lacking:
            raise ICLInputError(
                f"Data file {path}: record {lacking[0]} has only a question; add its 'solution' and/or 'answer' "
                "(documents to read need them; only questions to be answered may lack them)."
            )
    return data[:limit] if limit else data


def format_document(doc: dict) -> str:
    return f"Problem: {doc['question']}\nSolution: {doc.get('solution', '')}\nAnswer: {doc.get('answer', '')}\n\n"


def format_question(question: str) -> str:
    return f"Problem: {question}\nSolution:"


def note_instruction(mode: str, complexity: str, previous_note: str | None) -> tuple[str, str]:
    """(instruction, start of the model's note) for a note after a document."""
    text = _INSTRUCTIONS[(mode, complexity)]
    if mode == "notepad" and previous_note:
        text += f"\nPrevious notes:\n{previous_note}"
    return f"{text} Finish with {SENTINEL}.", ("- " if mode == "takeaways" else "Notes:\n")


def note_prompt(mode: str, complexity: str, previous_note: str | None) -> str:
    """The raw-text note prompt (no chat template): instruction, newline, start of the note."""
    instruction, start = note_instruction(mode, complexity, previous_note)
    return f"{instruction}\n{start}"


def _use_template(tokenizer, use_chat_template: bool) -> bool:
    return bool(use_chat_template) and has_chat_template(tokenizer)


def _chat_suffix(tokenizer, question: str) -> str:
    """Blank line, ``question``, end of the user turn and the assistant header (documents end with a blank line)."""
    return split_chat_prompt(tokenizer, "\n\n", question).suffix


def _tokens(tokenizer, text: str, first: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=first)["input_ids"]


def generate(model, tokenizer, cache, prompt_ids: list[int], max_new_tokens: int, *, stop: str | None = None,
             temperature: float = 0.0, top_p: float = 1.0, generator=None) -> tuple[str, list[int]]:
    """Feed ``prompt_ids`` and sample until EOS, ``max_new_tokens`` or ``stop`` (call inside apply_press).

    The stop string is looked for in the decoded text of the generated tokens only, so a sentinel quoted in
    the prompt does not stop generation and one split across several tokens still does. Returns the text up
    to the stop string and the generated ids (all fed to the cache but the last).
    """
    device = input_device(model)
    eos = eos_token_ids(model)
    out = model(input_ids=torch.tensor([prompt_ids], device=device), past_key_values=cache, logits_to_keep=1)
    generated: list[int] = []
    text = ""
    for step in range(max_new_tokens):
        tok = sample_token(out.logits[0, -1], temperature, top_p, generator)
        generated.append(tok)
        if tok in eos:
            break
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if stop and stop in text:
            return text[: text.index(stop)], generated
        if step + 1 < max_new_tokens:
            out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, logits_to_keep=1)
    return tokenizer.decode(generated, skip_special_tokens=True), generated


def check_budget(budget, window_size: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= window_size:
        raise ICLInputError(f"--budget must be an integer larger than --window_size ({window_size}), got {budget!r}.")


def existing_cache(out, model=None) -> dict | None:
    """The verified metadata of the cache at ``out``, None when there is none; raises if ``out`` is not ours or
    holds a damaged cache (then ``--recompute`` replaces it)."""
    out = check_cache_target(out)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / METADATA_FILE).is_file():
        raise CacheFormatError(f"{out} holds a damaged cache (no {METADATA_FILE}); pass --recompute to replace it.")
    return load_cache(out, model=model)[1]


_PRESS_SETTINGS = {"window_size": "window_size", "rotate": "rotate_keys", "rotation_offset": "rotation_offset",
                   "buffer": "compression_interval"}
_EXTRA_SETTINGS = ("budget", "mode", "summary_complexity", "num_epochs", "max_note_tokens")


def check_same_settings(meta: dict, out, documents: list[dict], **settings) -> None:
    """Raise unless the cache at ``out`` (its metadata ``meta``) was made from ``documents`` with ``settings``
    (precompute's keyword arguments): a cache is reused only for the run that would have made it."""
    extra, press = meta.get("extra") or {}, (meta.get("press") or {}).get("params") or {}
    differ = [f"{k} {extra[k]!r} (asked {settings[k]!r})" for k in _EXTRA_SETTINGS
              if k in settings and k in extra and extra[k] != settings[k]]
    differ += [f"{k} {press[name]!r} (asked {settings[k]!r})" for k, name in _PRESS_SETTINGS.items()
               if k in settings and name in press and press[name] != settings[k]]
    if "documents" in extra and json.loads(json.dumps(documents)) != extra["documents"]:
        differ.append("the documents (--data changed)")
    if differ:
        raise ICLInputError(f"{out} holds a cache made with other settings: {'; '.join(differ)}; pass --recompute to "
                            "replace it, or another --out.")


def precompute(model, tokenizer, documents: list[dict], out, *, budget: int = 128, mode: str = "takeaways",
               summary_complexity: str = "simple", num_epochs: int = 1, window_size: int = 8, rotate: bool = False,
               rotation_offset: int = 0, buffer: int = 128, max_note_tokens: int = 64, recompute: bool = False,
               use_chat_template: bool = True) -> dict:
    """Read ``documents`` (and write notes) into an R-KV cache saved at ``out``; returns its metadata.

    ``out`` must be missing, empty or one of our caches (:func:`kvpress_ext.storage.cache_files.check_cache_target`). If it
    already holds a valid cache of this model, the work is skipped and the saved metadata returned (with
    ``reused=True``) unless ``recompute``. Runs under the lock of ``out``: a second process writing the same path
    waits, then reuses the cache the first one saved. ``use_chat_template`` lays the cache out as a chat (see the
    module docstring) when the model has a template.
    """
    out = Path(out)
    if not documents:
        raise ICLInputError("No documents to read: pass --data with at least one question/solution/answer object.")
    if mode not in MODES:
        raise ICLInputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if summary_complexity not in COMPLEXITIES:
        raise ICLInputError(f"--summary_complexity must be one of {', '.join(COMPLEXITIES)}, got {summary_complexity!r}.")
    check_budget(budget, window_size)
    if num_epochs < 1:
        raise ICLInputError(f"--num_epochs must be >= 1, got {num_epochs}.")
    check_cache_target(out)
    with path_lock(out, on_wait=waiting_note(out)):
        recover(out)
        if not recompute:
            meta = existing_cache(out, model=model)
            if meta is not None:
                check_same_settings(meta, out, documents, budget=budget, mode=mode, num_epochs=num_epochs,
                                    summary_complexity=summary_complexity, window_size=window_size, rotate=rotate,
                                    rotation_offset=rotation_offset, buffer=buffer, max_note_tokens=max_note_tokens)
                return {**meta, "reused": True}
        meta = _precompute(model, tokenizer, documents, out, budget=budget, mode=mode,
                           summary_complexity=summary_complexity, num_epochs=num_epochs, window_size=window_size,
                           rotate=rotate, rotation_offset=rotation_offset, buffer=buffer,
                           max_note_tokens=max_note_tokens, use_chat_template=use_chat_template)
    return {**meta, "reused": False}


def _precompute(model, tokenizer, documents, out, *, budget, mode, summary_complexity, num_epochs, window_size,
                rotate, rotation_offset, buffer, max_note_tokens, use_chat_template) -> dict:
    press = RKVPress(budget=budget, window_size=window_size, rotate_keys=rotate, rotation_offset=rotation_offset,
                     compression_interval=buffer)
    templated = _use_template(tokenizer, use_chat_template)
    cache = DynamicCache()
    token_ids: list[int] = []
    notes: list[dict] = []
    note = None
    # With a template the first document follows the template's prefix (system turn, user header).
    pending = split_chat_prompt(tokenizer, "", "").ids(tokenizer)[0] if templated else []
    with apply_press(press, model), torch.no_grad():
        for epoch in range(num_epochs):
            for i, doc in enumerate(documents):
                ids = pending + _tokens(tokenizer, format_document(doc), first=not token_ids and not templated)
                pending = []
                model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
                token_ids += ids
                if mode == "none":
                    continue
                if templated:  # the instruction ends the user turn; the note is the assistant's reply
                    instruction, start = note_instruction(mode, summary_complexity, note)
                    prompt = _tokens(tokenizer, _chat_suffix(tokenizer, instruction) + start, first=False)
                else:
                    prompt = _tokens(tokenizer, note_prompt(mode, summary_complexity, note), first=False)
                text, gen = generate(model, tokenizer, cache, prompt, max_note_tokens, stop=SENTINEL)
                token_ids += prompt + gen[:-1]  # the last sampled token was never fed
                if templated:  # close the reply, reopen the user turn for the next document
                    pending = _tokens(tokenizer, chat_turn_break(tokenizer), first=False)
                note = text.strip()
                notes.append({"epoch": epoch, "document": i, "text": note, "tokens": len(gen)})
        if pending:  # end inside a user turn, where the questions are asked
            model(input_ids=torch.tensor([pending]), past_key_values=cache, logits_to_keep=1)
            token_ids += pending
    extra = {
        "workflow": "icl", "mode": mode, "summary_complexity": summary_complexity, "num_epochs": num_epochs,
        "budget": budget, "documents": documents, "notes": notes, "tokens_seen": len(token_ids),
        "chat_template": templated, "max_note_tokens": max_note_tokens,
    }
    save_cache(cache, out, model=model, token_ids=token_ids, press=press, extra=extra)
    return read_metadata(out)


def question_ids(tokenizer, question: str, templated: bool) -> list[int]:
    """The tokens that ask ``question`` after the cached documents (chat suffix + ``Solution:`` with a template)."""
    if templated:
        return _tokens(tokenizer, _chat_suffix(tokenizer, f"Problem: {question}") + "Solution:", first=False)
    return _tokens(tokenizer, format_question(question), first=False)


def evaluate(model, tokenizer, cache_dir, questions: list[dict], *, repeat: int = 1, max_new_tokens: int = 128,
             temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, compress: bool = True,
             use_chat_template: bool | None = None) -> dict:
    """Answer every question ``repeat`` times, each time from an untouched copy of the saved cache.

    Questions are asked the way the cache was written (with or without the chat template); ``use_chat_template``
    may only confirm that (a mismatch is an error naming the fix)."""
    if repeat < 1:
        raise ICLInputError(f"--repeat must be >= 1, got {repeat}.")
    templated = bool(read_metadata(cache_dir).get("extra", {}).get("chat_template", False))
    if use_chat_template is not None and bool(use_chat_template) != templated:
        raise ICLInputError(
            f"The cache {cache_dir} was written {'with' if templated else 'without'} the chat template: "
            f"{'drop' if templated else 'pass'} --no_chat_template, or precompute it again.")
    if templated and not has_chat_template(tokenizer):
        raise ICLInputError(f"The cache {cache_dir} was written with a chat template this tokenizer lacks: "
                            "use the model it was written with.")
    base, meta = load_cache(cache_dir, model=model)
    press = None
    if compress and meta.get("press"):
        press = press_from_description(meta["press"], f"Cache at {cache_dir}",
                                       f"recompute it (`kvpress-ext icl precompute --out {cache_dir} --recompute`)")
    generator = torch.Generator().manual_seed(seed)
    random.seed(seed)
    records = []
    with apply_press(press, model), torch.no_grad():
        for q in questions:
            generations, lengths, cache_lengths = [], [], []
            prompt = question_ids(tokenizer, q["question"], templated)
            for _ in range(repeat):
                cache = copy.deepcopy(base)
                text, gen = generate(model, tokenizer, cache, prompt, max_new_tokens, temperature=temperature,
                                     top_p=top_p, generator=generator)
                generations.append(text)
                lengths.append(len(gen))
                cache_lengths.append(cache.get_seq_length())
            records.append({"question": q["question"], "answer": q.get("answer"), "generations": generations,
                            "lengths": lengths, "cache_lengths_after": cache_lengths})
    return {
        "cache_dir": str(cache_dir), "cache_length": base.get_seq_length(), "cache_seq_lengths": meta["seq_lengths"],
        "settings": {"repeat": repeat, "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "top_p": top_p, "seed": seed, "compress": compress, "chat_template": templated},
        "cache_extra": {k: v for k, v in meta.get("extra", {}).items() if k not in ("documents",)},
        "records": records,
    }


def read_eval_records(path) -> list[dict]:
    """The records of an ``icl eval`` result file, checked: a JSON object whose ``records`` is a non-empty list of
    objects with a ``generations`` list of strings."""
    fix = f"pass the JSON file `kvpress-ext icl eval --out {path}` wrote"
    text = read_text_file(path, "--eval", "the JSON file `kvpress-ext icl eval --out` wrote")
    try:
        data = load_json(text, f"--eval {path}")
    except json.JSONDecodeError as exc:
        raise ICLInputError(f"--eval {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}.") from None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ICLInputError(f"--eval {path} is not an icl eval result (no 'records' list); {fix}.")
    if not records:
        raise ICLInputError(f"--eval {path} holds no records (nothing was evaluated); {fix} after answering questions.")
    for i, r in enumerate(records):
        gens = r.get("generations") if isinstance(r, dict) else None
        if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens) or "answer" not in r:
            raise ICLInputError(f"--eval {path}: record {i} lacks an 'answer' and a 'generations' list of strings; "
                                f"{fix}.")
    return records


def score(eval_json, csv_path=None) -> tuple[dict, str]:
    """pass@k of an ``evaluate`` result file; writes the CSV if asked and returns (result, printed table)."""
    path = Path(eval_json)
    if not path.exists():
        raise ICLInputError(f"Eval results {path} do not exist; run `kvpress-ext icl eval --out {path}` first.")
    result = score_generations(read_eval_records(path))
    if csv_path:
        write_scores_csv(result, csv_path)
    return result, format_scores_table(result)


_MODELS: dict = {}


def _cached_model(name: str, placement: dict | None = None, threads: int | None = None):
    """(model, tokenizer) for ``name`` (``placement``: load_model's device_map/max_memory/offload_folder),
    loaded once per process (each Ray worker loads its own) with ``threads`` torch CPU threads."""
    set_threads(threads)
    key = json.dumps([name, placement], sort_keys=True, default=str)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(name, **(placement or {}))
    return _MODELS[key]


def grid_cell(params: dict) -> dict:
    """One grid cell: precompute the cache into ``params["dir"]/cache`` (kept if there), answer the questions
    into ``eval.json`` (kept if there, unless ``recompute``), score into ``scores.csv``; returns the table row."""
    model, tok = _cached_model(params["model"], params.get("placement"), params.get("_threads"))
    docs = load_documents(params["data"], params["data_limit"], require_solution=True)
    questions = load_documents(params["eval_data"] or params["data"], params["eval_limit"],
                               flag="--eval_data" if params["eval_data"] else "--data")
    out = Path(params["dir"])
    pre = params["precompute"]
    precompute(model, tok, docs, out / "cache", **pre)
    eval_file = out / "eval.json"
    if not eval_file.is_file() or pre["recompute"]:
        result = evaluate(model, tok, out / "cache", questions, **params["evaluate"])
        write_output(eval_file, json.dumps(result, indent=2), flag="--out_dir")
    scores, _ = score(eval_file, out / "scores.csv")
    return {"budget": pre["budget"], "mode": pre["mode"],
            "complexity": pre["summary_complexity"] if pre["mode"] != "none" else "",
            "pass@1": scores["pass_at_k"][1]["mean"],
            "correct": scores["total_correct"], "samples": scores["total_samples"],
            "cache_length": load_json(eval_file.read_bytes(), str(eval_file))["cache_length"]}
