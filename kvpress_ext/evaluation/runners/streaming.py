"""The streaming runner behind ``evaluation/streaming_quality.py``: per-token NLLs of StreamingLLM caches over a long
text stream, one method per run, saved as ``<out_dir>/<method>.pt`` (so long runs can go in the background one by
one; :mod:`kvpress_ext.evaluation.reports.streaming` merges them).

Methods, all at the same ``cap_total``: dense (growing cache), reference (sliding window of sinks + recent tokens
recomputed from scratch for every target), eager (lazy_streaming with slack=0) and lazy (slack > 0). The text is a
file, a folder's .txt files joined by name, or by default Pride and Prejudice followed by the Paul Graham essays of
the shared folder. On a GPU every method does the same Python work per forward as on the CPU: dense and lazy feed
chunks, eager one token per forward (slack 0: it compacts after every token), the reference one batch of ``batch``
windows per forward for every ``stride``-th target.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.evaluation.streaming import StreamingInputError, dense_nlls, recompute_reference_nlls, streaming_nlls
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.storage.inputs import read_text_file, shared_dir
from kvpress_ext.storage.safe_write import claim_output_dir, write_output

METHODS = ("dense", "reference", "eager", "lazy")


def _fail(message: str):
    raise StreamingInputError(message)


def default_text_files() -> list[Path]:
    """Pride and Prejudice, then the Paul Graham essays (sorted by name): over 300k tokens of continuous text."""
    essays = shared_dir() / "data" / "paul_graham_essays"
    return [shared_dir() / "data" / "pride_and_prejudice.txt", *sorted(essays.glob("*.txt"))]


def text_files(text_file: str | None) -> list[Path]:
    """The files of ``--text_file`` (a file, or a folder's .txt files by name), or :func:`default_text_files`."""
    if text_file is None:
        files = [f for f in default_text_files() if f.is_file()]
        if not files:
            _fail(f"no default text in {shared_dir() / 'data'}; pass --text_file PATH or set KVPRESS_EXT_SHARED")
        return files
    path = Path(text_file)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            _fail(f"--text_file {path} is a folder without .txt files; pass a text file or a folder of them")
        return files
    if not path.is_file():
        _fail(f"--text_file {path} does not exist; pass an existing text file or folder")
    return [path]


def text_label(files: list[Path]) -> str:
    return files[0].name if len(files) == 1 else f"{files[0].name} + {len(files) - 1} more ({files[1].parent.name})"


def load(tokens: int, model_name: str = "smollm2-135m", text_file: str | None = None, device: str | None = None,
         dtype: str = "float32"):
    """(model, ids of ``tokens + 1`` tokens, text label); bad input: one line, exit 2."""
    files = text_files(text_file)
    model, tok = get_model(model_name, device=device, dtype=dtype)
    parts, chars = [], 0
    for f in files:  # read only what ``tokens`` can need (about 8 characters a token at most)
        parts.append(read_text_file(f, "--text_file"))
        chars += len(parts[-1])
        if chars >= tokens * 8:
            break
    text = "\n\n".join(parts)
    ids = torch.tensor(tok(text[: tokens * 8])["input_ids"])[: tokens + 1]
    if len(ids) < tokens + 1:
        _fail(f"--text_file has {len(ids)} tokens, fewer than --tokens {tokens} + 1; pass a longer text or fewer tokens")
    return model, ids, text_label(files)


def run(args):
    """Compute ``args.method``'s per-token NLLs and save them with the settings and the machine load."""
    model, ids, label = load(args.tokens, args.model, args.text_file, args.device, args.dtype)
    load_start = machine_load()
    start = time.time()
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    if args.method == "dense":
        nlls = dense_nlls(model, ids)
    elif args.method == "reference":
        def progress(done, total):
            print(f"reference {done}/{total} {time.time() - start:.0f}s", flush=True)
        nlls = recompute_reference_nlls(model, ids, n_sink=args.n_sink, total=args.cap_total, batch=args.batch,
                                        stride=args.stride, progress=progress, deadline=deadline)
    else:
        slack = 0 if args.method == "eager" else args.slack
        nlls = streaming_nlls(model, ids, LazyStreamingPress(n_sink=args.n_sink, cap_total=args.cap_total, slack=slack),
                               deadline=deadline)
    seconds = time.time() - start
    out = claim_output_dir(args.out_dir, "--out_dir")
    meta = {k: v for k, v in vars(args).items() if k != "report"}
    meta.update(text=label, device=str(next(model.parameters()).device))
    meta["slack"] = 0 if args.method == "eager" else args.slack
    meta.update(load_start=load_start, load_end=machine_load())  # timings on a busy machine are not idle ones
    meta["stopped_early"] = len(nlls) < len(ids) - 1  # --max_seconds ran out: a prefix of the stream
    save_run(out / f"{args.method}.pt", {"nlls": nlls, "seconds": seconds, "args": meta})
    early = f" (stopped by --max_seconds, {len(ids) - 1} asked)" if meta["stopped_early"] else ""
    print(f"{args.method}: {len(nlls)} predictions in {seconds:.1f}s on {meta['device']}{early}; "
          f"saved to {out / (args.method + '.pt')}")


def save_run(path: Path, run: dict) -> None:
    """``torch.save`` of one method's run, written atomically through :mod:`kvpress_ext.storage.safe_write`."""
    import io

    buffer = io.BytesIO()
    torch.save(run, buffer)
    write_output(path, buffer.getvalue(), flag="--out_dir", what="a saved run (torch file)",
                 is_ours=lambda existing: existing.read_bytes()[:4] == b"PK\x03\x04")
