"""``kvpress-ext icl {precompute,eval,score,grid,cluster}``: a thin command line over :mod:`kvpress_ext.icl.workflow`
and :mod:`kvpress_ext.icl.cluster`."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from kvpress_ext.cli.common import (
    add_model_argument,
    add_placement_args,
    add_sweep_args,
    add_threads_argument,
    placement_kwargs,
    positive_int,
    probability_mass,
    seed_int,
    set_threads,
    sweep_options_from_args,
    temperature,
    token_offset,
)
from kvpress_ext.evaluation.sweep import Cell, cell_path, import_ray, run_sweep
from kvpress_ext.icl import cluster
from kvpress_ext.icl import workflow as wf
from kvpress_ext.icl.scoring import SCORES_CSV_WHAT, is_scores_csv
from kvpress_ext.runtime.models import load_model, resolve_model
from kvpress_ext.storage.cache_files import check_cache_target
from kvpress_ext.storage.inputs import path_digest
from kvpress_ext.storage.safe_write import (
    check_output_dir,
    check_output_file,
    claim_output_dir,
    save_figure,
    write_output,
)


def _load_model(args):
    set_threads(args.threads)
    return load_model(args.model, **placement_kwargs(args))


def _add_cache_args(p):
    p.add_argument("--budget", type=positive_int, default=128, help="R-KV cache budget per head (tokens)")
    p.add_argument("--window_size", type=positive_int, default=8, help="R-KV: recent tokens always kept")
    p.add_argument("--buffer", type=positive_int, default=128, help="R-KV compression interval while writing notes")
    p.add_argument("--num_epochs", type=positive_int, default=1, help="passes over the documents")
    p.add_argument("--data_limit", type=positive_int, default=None, help="use only the first N documents")
    p.add_argument("--rotate", action="store_true", help="re-rotate kept keys to contiguous positions")
    p.add_argument("--rotation_offset", type=token_offset, default=0, help="gap between the prefix and the first rotated key")
    p.add_argument("--max_note_tokens", type=positive_int, default=64, help="most tokens of each written note")
    p.add_argument("--recompute", action="store_true",
                   help="replace an existing cache (only ever one of ours: another file or directory is refused)")
    add_threads_argument(p)


def _add_eval_args(p):
    p.add_argument("--repeat", type=positive_int, default=1, help="samples per question")
    p.add_argument("--max_new_tokens", type=positive_int, default=128, help="most tokens per answer")
    p.add_argument("--temperature", type=temperature, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top_p", type=probability_mass, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling generator")
    p.add_argument("--no_compress", action="store_true", help="do not keep compressing while answering")


def _precompute_kwargs(args, mode, complexity, budget):
    return {"budget": budget, "mode": mode, "summary_complexity": complexity, "num_epochs": args.num_epochs,
                "window_size": args.window_size, "rotate": args.rotate, "rotation_offset": args.rotation_offset,
                "buffer": args.buffer, "max_note_tokens": args.max_note_tokens, "recompute": args.recompute,
                "use_chat_template": args.use_chat_template}


def _eval_kwargs(args):
    # eval follows the cache's layout; --no_chat_template only confirms a cache written without the template
    return {"repeat": args.repeat, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "seed": args.seed, "compress": not args.no_compress,
                "use_chat_template": None if args.use_chat_template else False}


def _cmd_precompute(args) -> int:
    wf.check_budget(args.budget, args.window_size)
    docs = wf.load_documents(args.data, args.data_limit, require_solution=True)
    check_cache_target(args.out)  # a file or a user's directory is refused, with or without --recompute
    settings = _precompute_kwargs(args, args.mode, args.summary_complexity, args.budget)
    meta = None if args.recompute else wf.existing_cache(args.out)  # verified (raises if damaged)
    if meta is not None:
        wf.check_same_settings(meta, args.out, docs, **settings)
        print(f"{args.out} holds a valid cache of the same settings; skipping (use --recompute to replace it)")
        return 0
    model, tok = _load_model(args)
    meta = wf.precompute(model, tok, docs, args.out, **settings)
    if meta["reused"]:
        print(f"{args.out} was written meanwhile by another run and holds a valid cache; reused it")
        return 0
    print(f"saved cache of {max(meta['seq_lengths'])} tokens/head ({meta['extra']['tokens_seen']} read) to {args.out}")
    return 0


def _questions(args):
    if args.question:
        return [{"question": args.question, "answer": args.answer}]
    if args.data:
        return wf.load_documents(args.data, args.data_limit)
    raise wf.ICLInputError("Pass --question TEXT or --data FILE.")


def _cmd_eval(args) -> int:
    wf.read_metadata(args.cache)  # fails fast with a clear message
    check_output_file(args.out, flag="--out")
    questions = _questions(args)
    model, tok = _load_model(args)
    result = wf.evaluate(model, tok, args.cache, questions, **_eval_kwargs(args))
    out = write_output(args.out, json.dumps(result, indent=2), flag="--out")
    print(f"{sum(len(r['generations']) for r in result['records'])} generations from a "
          f"{result['cache_length']}-token cache written to {out}")
    return 0


def _cmd_score(args) -> int:
    if args.csv:
        check_output_file(args.csv, flag="--csv", is_ours=is_scores_csv, what=SCORES_CSV_WHAT)
    _, table = wf.score(args.eval, args.csv)
    print(table)
    return 0


def _cmd_grid(args) -> int:
    for b in args.budgets:
        wf.check_budget(b, args.window_size)
    wf.load_documents(args.data, args.data_limit, require_solution=True)  # bad input fails before any cell or file
    wf.load_documents(args.eval_data or args.data, args.eval_limit, flag="--eval_data" if args.eval_data else "--data")
    out_dir = check_output_dir(args.out_dir, flag="--out_dir")
    options = sweep_options_from_args(args)
    placement = placement_kwargs(args)
    if options.executor == "ray":
        import_ray()
        resolve_model(args.model)  # the workers load it; a missing directory fails here
    else:  # the cells reuse this process's model: a bad --model fails before --out_dir is created
        wf._cached_model(args.model, placement, args.threads)
    claim_output_dir(out_dir, flag="--out_dir")  # the cells write their runs into it
    # part of each cell's key: an edited data file or another model's weights are computed anew
    inputs = {"model": path_digest(resolve_model(args.model)), "data": path_digest(args.data),
              "eval_data": path_digest(args.eval_data) if args.eval_data else None}
    cells = []
    for mode in args.modes:
        for complexity in (args.complexities if mode != "none" else args.complexities[:1]):
            for budget in args.budgets:
                name = f"b{budget}_{mode}" + ("" if mode == "none" else f"_{complexity}")
                params = {"model": args.model, "placement": placement, "data": str(Path(args.data).resolve()),
                          "eval_data": str(Path(args.eval_data).resolve()) if args.eval_data else None,
                          "data_limit": args.data_limit, "eval_limit": args.eval_limit,
                          "dir": str((out_dir / name).resolve()),
                          "precompute": _precompute_kwargs(args, mode, complexity, budget),
                          "evaluate": _eval_kwargs(args), "_threads": args.threads, "inputs": inputs}
                cells.append(Cell(name, params))
                if args.recompute:
                    cell_path(out_dir, name, params).unlink(missing_ok=True)
    result = run_sweep(cells, wf.grid_cell, out_dir, options, desc="icl grid", flag="--out_dir")
    rows = [result.records[c.key] for c in cells if c.key in result.records]
    for key in result.failed:
        print(f"cell {key} failed: {result.cells[key]['error']}", file=sys.stderr)
    if not rows:
        return 1
    fh = io.StringIO(newline="")
    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_output(out_dir / "grid.csv", fh.getvalue(), flag="--out_dir", is_ours=lambda p: True)  # our directory
    print(f"{'budget':>7} {'mode':>10} {'complexity':>10} {'pass@1':>7} {'cache':>6}")
    for r in rows:
        print(f"{r['budget']:>7} {r['mode']:>10} {r['complexity']:>10} {r['pass@1']:>7.3f} {r['cache_length']:>6}")
    _plot(rows, out_dir / "grid.png")
    print(f"table: {out_dir / 'grid.csv'}  plot: {out_dir / 'grid.png'}")
    return 1 if result.failed else 0


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in sorted({(r["mode"], r["complexity"]) for r in rows}):
        pts = sorted((r["budget"], r["pass@1"]) for r in rows if (r["mode"], r["complexity"]) == key)
        ax.plot(*zip(*pts), marker="o", label=" ".join(k for k in key if k))
    ax.set_xlabel("R-KV budget (tokens per head)")
    ax.set_ylabel("pass@1")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, flag="--out_dir", dpi=120)
    plt.close(fig)


def _cmd_cluster_build(args) -> int:
    set_threads(args.threads)
    docs = wf.load_documents(args.data)
    check_output_file(args.out, flag="--out")
    clusters = cluster.build_clusters(docs, args.embedder, args.k, args.seed, batch_size=args.batch_size)
    out = cluster.save_clusters(clusters, args.out, data_path=args.data)
    sizes = ", ".join(str(len(m)) for m in clusters["clusters"])
    print(f"{args.k} clusters of {len(docs)} questions (sizes {sizes}) written to {out}")
    return 0


def _cmd_cluster_query(args) -> int:
    set_threads(args.threads)
    clusters = cluster.load_clusters(args.clusters)
    check_output_file(args.out, flag="--out")
    cluster_id, records = cluster.nearest_cluster(clusters, args.question, args.embedder)
    out = write_output(args.out, json.dumps({"cluster": cluster_id, "question": args.question, "records": records},
                                            indent=2), flag="--out")
    print(f"cluster {cluster_id} ({len(records)} records) written to {out}")
    return 0


def _int_list(text: str) -> list[int]:
    values = [positive_int(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _str_list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items

    return parse


def add_parser(subparsers) -> None:
    icl = subparsers.add_parser("icl", help="compress-in-context: precompute a bounded cache of examples, answer, score")
    sub = icl.add_subparsers(dest="icl_command", required=True)

    p = sub.add_parser("precompute", help="read documents (and write notes) into a saved R-KV cache")
    p.add_argument("--data", required=True, help="JSON list of {question, solution, answer}")
    add_model_argument(p)
    p.add_argument("--mode", choices=wf.MODES, default="takeaways", help="what the model writes after each document")
    p.add_argument("--summary_complexity", choices=wf.COMPLEXITIES, default="simple", help="how detailed the notes are")
    p.add_argument("--out", required=True,
                   help="cache directory to write: a new path, an empty directory, or an existing cache (reused)")
    _add_cache_args(p)
    add_placement_args(p)
    p.set_defaults(func=_cmd_precompute)

    p = sub.add_parser("eval", help="answer questions from a saved cache (each sample from a fresh copy)")
    p.add_argument("--cache", required=True, help="cache directory written by `icl precompute`")
    add_model_argument(p)
    p.add_argument("--question", help="one question to answer (or --data)")
    p.add_argument("--answer", default=None, help="reference answer for --question")
    p.add_argument("--data", help="JSON list of {question, answer} to answer (or --question)")
    p.add_argument("--data_limit", type=positive_int, default=None, help="answer only the first N questions")
    p.add_argument("--out", required=True, help="JSON file for the generations (missing parent directories are created)")
    _add_eval_args(p)
    add_threads_argument(p)
    add_placement_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("score", help="pass@k of an eval JSON (CSV + table)")
    p.add_argument("--eval", required=True, help="JSON written by `icl eval`")
    p.add_argument("--csv", default=None, help="also write the scores to this CSV file")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("grid", help="precompute + eval + score over budgets/modes/complexities (resumable)")
    p.add_argument("--data", required=True, help="JSON list of {question, solution, answer} read into the cache")
    p.add_argument("--eval_data", default=None, help="questions to answer (default: --data)")
    p.add_argument("--eval_limit", type=positive_int, default=None, help="answer only the first N questions")
    add_model_argument(p)
    p.add_argument("--budgets", type=_int_list, required=True, help="comma-separated, e.g. 64,128,256")
    p.add_argument("--modes", type=_str_list(wf.MODES), default=["takeaways"],
                   help=f"comma-separated, from {', '.join(wf.MODES)}")
    p.add_argument("--complexities", type=_str_list(wf.COMPLEXITIES), default=["simple"],
                   help=f"comma-separated, from {', '.join(wf.COMPLEXITIES)}")
    p.add_argument("--out_dir", required=True, help="directory for every run, grid.csv and grid.png")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar over cells")
    _add_cache_args(p)
    _add_eval_args(p)
    add_placement_args(p)
    add_sweep_args(p)
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("cluster", help="k-means questions by embedding; pick the nearest cluster as --data")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    c = csub.add_parser("build", help="embed the questions of --data, k-means them, save the clusters")
    c.add_argument("--data", required=True, help="JSON list of {question, solution, answer}")
    c.add_argument("--embedder", required=True, help="local sentence-transformers or Hugging Face model directory")
    c.add_argument("--k", type=positive_int, required=True, help="number of clusters")
    c.add_argument("--seed", type=seed_int, default=0, help="seed of the k-means initialisation")
    c.add_argument("--batch_size", type=positive_int, default=32, help="questions embedded per forward")
    c.add_argument("--out", required=True, help="clusters JSON file to write")
    add_threads_argument(c)
    c.set_defaults(func=_cmd_cluster_build)
    c = csub.add_parser("query", help="write the records of the cluster nearest a question (input for precompute)")
    c.add_argument("--clusters", required=True, help="clusters JSON written by `icl cluster build`")
    c.add_argument("--question", required=True, help="the new question")
    c.add_argument("--embedder", default=None, help="override the embedder directory saved in the clusters file")
    c.add_argument("--out", required=True,
                   help="JSON list for `icl precompute --data` (missing parent directories are created)")
    add_threads_argument(c)
    c.set_defaults(func=_cmd_cluster_query)
