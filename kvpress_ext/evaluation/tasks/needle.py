"""Needle tasks: a pass key, RULER's niah_single / multikey / multivalue needles, or multi-document QA, built
from a cell's plain parameters so every method, ratio and mode of a grid answers the same sample."""

from __future__ import annotations

import random

from kvpress_ext.evaluation import longcontext as lc

NEEDLE_TASKS = ("passkey", "niah_single", "multikey", "multivalue")
MULTIDOC = "multidoc"  # the pass key in one of several documents (needle.py --task multidoc)
KEYS = ["sunset", "harbor", "violin", "glacier", "lantern", "meadow", "falcon", "comet", "orchid", "quartz",
        "pepper", "canyon", "ember", "willow", "saturn", "marble"]


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
