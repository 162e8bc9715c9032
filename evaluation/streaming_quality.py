"""Per-segment perplexity of StreamingLLM caches over a long text stream (``--model``: a short name, default
smollm2-135m, a directory or a hub id; ``--text_file``: a file or a folder of .txt files, default Pride and Prejudice
followed by the Paul Graham essays of ../shared/data; the recorded stories260k results use
``--text_file ../shared/data/tinystories_val.txt``).

Methods: dense (growing cache), reference (sliding window of sinks + recent tokens recomputed from
scratch for every target), eager (lazy_streaming with slack=0) and lazy (slack > 0), all at the same
``cap_total``. Each method is a separate run that saves its per-token NLLs under ``--out_dir``
(so long runs can go in the background one by one); ``--report`` merges them into a JSON and a plot.

    PYTHONPATH=$PWD python evaluation/streaming_quality.py --model stories260k --method lazy --tokens 20000
    PYTHONPATH=$PWD python evaluation/streaming_quality.py --model stories260k --report

On a GPU (``--device``, default cuda if available) every method does the same Python work per forward as on the CPU:
dense and lazy feed chunks, eager one token per forward (slack 0: it compacts after every token), the reference one
batch of ``--batch`` windows per forward for every ``--reference_stride``-th target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from kvpress_ext.cli.common import add_threads_argument, command_entry, quiet_command_line, set_threads
from kvpress_ext.evaluation.results import machine_load

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))


def _fail(message: str):
    print(f"streaming_quality: error: {message}", file=sys.stderr)
    sys.exit(2)


def default_text_files() -> list[Path]:
    """Pride and Prejudice, then the Paul Graham essays (sorted by name): over 300k tokens of continuous text."""
    essays = SHARED / "data" / "paul_graham_essays"
    return [SHARED / "data" / "pride_and_prejudice.txt", *sorted(essays.glob("*.txt"))]


def text_files(text_file: str | None) -> list[Path]:
    """The files of ``--text_file`` (a file, or a folder's .txt files by name), or :func:`default_text_files`."""
    if text_file is None:
        files = [f for f in default_text_files() if f.is_file()]
        if not files:
            _fail(f"no default text in {SHARED / 'data'}; pass --text_file PATH or set KVPRESS_EXT_SHARED")
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
    from kvpress_ext.core.errors import KVPressExtError
    from kvpress_ext.runtime.models import load_model
    from kvpress_ext.storage.inputs import read_text_file

    files = text_files(text_file)
    try:
        model, tok = load_model(model_name, device=device, dtype=dtype)
        parts, chars = [], 0
        for f in files:  # read only what ``tokens`` can need (about 8 characters a token at most)
            parts.append(read_text_file(f, "--text_file"))
            chars += len(parts[-1])
            if chars >= tokens * 8:
                break
    except KVPressExtError as exc:
        _fail(str(exc))
    text = "\n\n".join(parts)
    ids = torch.tensor(tok(text[: tokens * 8])["input_ids"])[: tokens + 1]
    if len(ids) < tokens + 1:
        _fail(f"--text_file has {len(ids)} tokens, fewer than --tokens {tokens} + 1; pass a longer text or fewer tokens")
    return model, ids, text_label(files)


def run(args):
    from kvpress_ext.evaluation.streaming import dense_nlls, recompute_reference_nlls, streaming_nlls
    from kvpress_ext.presses.lazy_streaming import LazyStreamingPress

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
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "report"}
    meta.update(text=label, device=str(next(model.parameters()).device))
    meta["slack"] = 0 if args.method == "eager" else args.slack
    meta.update(load_start=load_start, load_end=machine_load())  # timings on a busy machine are not idle ones
    meta["stopped_early"] = len(nlls) < len(ids) - 1  # --max_seconds ran out: a prefix of the stream
    torch.save({"nlls": nlls, "seconds": seconds, "args": meta}, out / f"{args.method}.pt")
    early = f" (stopped by --max_seconds, {len(ids) - 1} asked)" if meta["stopped_early"] else ""
    print(f"{args.method}: {len(nlls)} predictions in {seconds:.1f}s on {meta['device']}{early}")


def report(args):
    from kvpress_ext.evaluation.streaming import segment_perplexity

    out = Path(args.out_dir)
    runs = {m: torch.load(out / f"{m}.pt", weights_only=True) for m in ("dense", "reference", "eager", "lazy") if (out / f"{m}.pt").exists()}
    nll = {m: r["nlls"] for m, r in runs.items()}
    seg = args.segment

    def common(*methods):
        """Targets scored by all ``methods`` (the reference may skip targets; eager may cover fewer tokens)."""
        n = min(len(nll[m]) for m in methods)
        mask = torch.ones(n, dtype=torch.bool)
        for m in methods:
            mask &= ~torch.isnan(nll[m][:n])
        return n, mask

    if not runs:
        _fail(f"no saved run in {out}; run --method dense/reference/eager/lazy first (same --out_dir)")
    first = next(iter(runs.values()))["args"]
    text = first.get("text", "tinystories_val.txt")  # runs saved before --text_file read TinyStories
    device = first.get("device", "cpu")
    result = {
        "model": args.model, "text": text, "segment": seg,
        "machine": "CPU, 2 cores (shared)" if device == "cpu" else device,
        "predictions": {m: len(v) for m, v in nll.items()},
        "stopped_early": sorted(m for m, r in runs.items() if r["args"].get("stopped_early")),  # --max_seconds
        "settings": {m: r["args"] for m, r in runs.items()}, "seconds": {m: r["seconds"] for m, r in runs.items()},
        "segment_ppl_all_targets": {m: segment_perplexity(v, seg) for m, v in nll.items()},
    }
    if "reference" in nll:  # every method scored on the targets the reference computed
        result["segment_ppl_reference_targets"] = {}
        for m in nll:
            n, mask = common(m, "reference")
            result["segment_ppl_reference_targets"][m] = segment_perplexity(nll[m][:n], seg, mask)
    checks = {}
    if "lazy" in nll and "reference" in nll:
        n, mask = common("lazy", "reference")
        lazy, ref = (segment_perplexity(nll[m][:n], seg, mask) for m in ("lazy", "reference"))
        ratios = [a / b for a, b in zip(lazy, ref)]
        checks["lazy_vs_reference_tokens"] = n
        checks["lazy_vs_reference_scored_targets"] = int(mask.sum())
        checks["lazy_vs_reference_segment_ratio"] = [round(r, 4) for r in ratios]
        checks["lazy_vs_reference_max_segment_deviation"] = max(abs(r - 1) for r in ratios)
        checks["lazy_within_5pct_of_reference_every_segment"] = all(abs(r - 1) <= 0.05 for r in ratios)
    if "lazy" in nll and "eager" in nll:
        n, mask = common("lazy", "eager")
        lazy, eager = (math.exp(float(nll[m][:n][mask].mean())) for m in ("lazy", "eager"))
        checks["lazy_vs_eager_tokens"] = n
        checks["lazy_vs_eager_overall_ppl"] = {"lazy": lazy, "eager": eager, "relative": lazy / eager - 1}
        checks["lazy_within_2pct_of_eager_overall"] = abs(lazy / eager - 1) <= 0.02
    result["checks"] = checks
    from kvpress_ext.storage.safe_write import check_output_file, save_figure, write_output

    check_output_file(args.plot, kind="image", flag="--plot")
    write_output(args.json, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("predictions", "stopped_early", "checks")}, indent=1))
    curves = result.get("segment_ppl_reference_targets", result["segment_ppl_all_targets"])
    for m, v in curves.items():
        print(f"{m:>9}: " + " ".join(f"{x:.2f}" for x in v[:24]) + (" ..." if len(v) > 24 else ""))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_panel = "segment_ppl_reference_targets" in result
    fig, axes = plt.subplots(2 if ratio_panel else 1, 1, figsize=(9, 7 if ratio_panel else 4.5), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]} if ratio_panel else None)
    ax = axes[0][0]
    style = {"dense": "k:", "reference": "g-", "eager": "b--", "lazy": "r-."}

    def label(m):
        text = m if m not in ("eager", "lazy") else f"{m} (slack={runs[m]['args']['slack']})"
        if m == "reference" and runs[m]["args"]["stride"] > 1:
            text += f" (every {runs[m]['args']['stride']}th target)"
        if runs[m]["args"].get("stopped_early"):
            text += f" (first {len(nll[m])} predictions: --max_seconds)"
        return text

    for m, v in result["segment_ppl_all_targets"].items():
        ax.plot([(i + 0.5) * seg for i in range(len(v))], v, style[m], label=label(m))
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity per {seg}-token segment")
    cap = first.get("cap_total", args.cap_total)
    ax.set_title(f"{args.model} on {text}: StreamingLLM, cap_total={cap}, {first.get('n_sink', 4)} sinks",
                 fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    if ratio_panel:  # the streaming curves relative to the reference, on the reference's targets
        ref = result["segment_ppl_reference_targets"]["reference"]
        bx = axes[1][0]
        for m in ("eager", "lazy"):
            if m in result["segment_ppl_reference_targets"]:
                v = result["segment_ppl_reference_targets"][m]
                bx.plot([(i + 0.5) * seg for i in range(len(v))], [a / b for a, b in zip(v, ref)], style[m],
                        label=label(m))
        bx.axhspan(0.95, 1.05, color="g", alpha=0.1, label="within 5 % of the reference")
        bx.set_ylabel("perplexity / reference")
        bx.legend(fontsize=8)
        bx.grid(alpha=0.3)
    axes[-1][0].set_xlabel("token index in the stream")
    fig.tight_layout()
    save_figure(fig, args.plot, dpi=120)
    print(f"wrote {args.json} and {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m, stories260k), local directory or hub id (default: %(default)s)")
    p.add_argument("--method", choices=["dense", "reference", "eager", "lazy"], help="the one method this run computes")
    p.add_argument("--report", action="store_true", help="merge saved runs into JSON + plot")
    p.add_argument("--tokens", type=int, default=20000, help="length of the token stream")
    p.add_argument("--text_file", default=None,
                   help="text file, or a folder whose .txt files are joined by name (default: Pride and Prejudice "
                        "followed by the Paul Graham essays in ../shared/data)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"],
                   help="model weights dtype (auto: as saved)")
    # The dashed spellings are the former names, kept so old commands still run.
    p.add_argument("--cap_total", "--cap-total", type=int, default=512, help="most tokens in the cache (all methods)")
    p.add_argument("--n_sink", "--n-sink", type=int, default=4, help="attention sinks kept")
    p.add_argument("--slack", type=int, default=64, help="lazy: tokens allowed past the cap before a compaction")
    p.add_argument("--batch", type=int, default=16, help="reference windows per forward")
    p.add_argument("--stride", "--reference_stride", type=int, default=1,
                   help="reference: score every stride-th target (a forward of cap_total tokens per scored target)")
    p.add_argument("--max_seconds", type=float, default=None,
                   help="reference / eager / lazy: stop after this long and save the predictions made so far")
    p.add_argument("--segment", type=int, default=512, help="tokens per point of the perplexity curve")
    p.add_argument("--out_dir", "--out-dir", default=str(REPO / "results" / "streaming_quality"),
                   help="where each method's per-token NLLs are saved")
    p.add_argument("--json", default=str(REPO / "results" / "streaming_quality.json"), help="report JSON file")
    p.add_argument("--plot", default=str(REPO / "docs" / "results" / "streaming_quality.png"), help="report plot file")
    add_threads_argument(p)
    return p


@command_entry("streaming_quality")
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    quiet_command_line("streaming_quality")
    set_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.report:
        report(args)
    elif args.method:
        run(args)
    else:
        p.error("give --method or --report")


if __name__ == "__main__":
    sys.exit(main())
