"""Reports of the long-context grids: ``summary.json`` (one record per model x method x ratio x rate x mode x
prefill chunk size x length x depth), ``summary.md`` (safe ratio, accuracy, needle kept, misses explained, chunked
prefill against one-shot, A3 time to first token) and the depth x length heat maps.

Cells prefilled in chunks (``prefill_chunk_size``) are kept out of the one-shot tables and shown in their own
table beside the one-shot accuracy of the same press and ratio."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from kvpress_ext.evaluation.intervals import NOTE, format_score, score_interval
from kvpress_ext.evaluation.longcontext import PREFILL, InputError, is_a3
from kvpress_ext.evaluation.results import measured_date
from kvpress_ext.evaluation.sweep import cell_path, load_cells
from kvpress_ext.storage.safe_write import claim_output_dir, save_figure, write_output

GROUP = ("model", "method", "compression_ratio", "rate", "query_aware", "prefill_chunk_size", "length", "depth")


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:g}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> list[dict]:
    """One record per model x method x ratio x rate x mode x length x depth: mean score over the samples, n, the
    mean's 95 % interval (``k``, ``ci_low``, ``ci_high``, ``ci_method``, as ``intervals.score_interval`` gives
    them), failures."""
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in GROUP)].append(r)
    out = []
    for key, recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        kept = [r["needle_kept"] for r in ok if r.get("needle_kept")]
        ci = score_interval([r["score"] for r in ok])
        out.append({**dict(zip(GROUP, key)), "score": _mean([r["score"] for r in ok]), "n": len(ok),
                    "k": ci["k"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "ci_method": ci["ci_method"],
                    "n_failed": len(recs) - len(ok), "ttft_s": _mean([r["ttft_s"] for r in ok]),
                    "tpot_s": _mean([r.get("tpot_s") for r in ok]), "cache_tokens": _mean([r.get("cache_tokens")
                                                                                           for r in ok]),
                    "compressed_cache_tokens": _mean([r.get("compressed_cache_tokens") for r in ok]),
                    "context_tokens": _mean([r.get("context_tokens") for r in ok]),
                    "needle_kept_mean": _mean([r.get("needle_kept_mean") for r in ok]),
                    "needle_kept_per_layer": [sum(col) / len(col) for col in zip(*kept)] if kept else None,
                    "errors": sorted({r["error"] for r in recs if r["status"] != "ok"})})
    return out


def _scores(records, **where) -> list:
    """The scores of the ok records of ``records`` that match ``where``."""
    return [r["score"] for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in where.items())]


def _accuracy(records, **where) -> tuple[float | None, int]:
    xs = _scores(records, **where)
    return (sum(xs) / len(xs) if xs else None), len(xs)


def _sample(r: dict) -> tuple:
    """What identifies a record's sample (its haystack, needle and key), whatever the method."""
    return tuple(r.get(k) for k in ("length", "depth", "key_index", "index", "sample_id"))


def _models(records: list[dict]) -> list:
    """The models of ``records`` (a record without one, as in hand-built records, counts as model None)."""
    return sorted({r.get("model") for r in records}, key=lambda m: (m is None, str(m)))


def safe_ratios(records: list[dict], fraction: float = 0.9) -> list[dict]:
    """Per model, press, length and mode: the largest ratio whose accuracy (over depths and keys) is at least
    ``fraction`` x no press's for the same model, mode and length (None if no ratio is), with the accuracies.
    Paired: each ratio is judged against no press on the samples that ratio ran, so a grid cut short (one press
    with fewer samples than no press) compares like with like. Records of several models (cells of several
    grids) give each model its own entries, never judged against another model's no press."""
    out = []
    for model in _models(records):
        mine_model = [r for r in records if r.get("model") == model]
        out += [{"model": model, **s} for s in _safe_ratios_one_model(mine_model, fraction)]
    return out


def _safe_ratios_one_model(records: list[dict], fraction: float) -> list[dict]:
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


def _measured(records: list[dict], reused) -> str:
    """``this run``, or the dates the reused cells among ``records`` were measured (``reused 2026-12-01``)."""
    dates = sorted({r.get("measured") or "?" for r in records if r["key"] in reused}) if reused else []
    if not dates:
        return "this run"
    every = all(r["key"] in reused for r in records)
    return ("reused " if every else "partly reused ") + ", ".join(dates)


def _columns(records: list[dict]) -> tuple[list[tuple], str]:
    """The report's columns, (model, length, mode) for each model's lengths x modes, and their header row; the
    model's name heads a column only when the records come from several models."""
    cols = []
    models = _models(records)
    for model in models:
        mine = [r for r in records if r.get("model") == model]
        lengths = sorted({r.get("length") for r in mine}, key=lambda x: (x is None, x))
        cols += [(model, n, qa) for n in lengths for qa in sorted({r["query_aware"] for r in mine})]
    name = (lambda m: f"{Path(str(m)).name} ") if len(models) > 1 else (lambda m: "")
    return cols, "| " + " | ".join(f"{name(m)}{n} {_mode(qa)}" for m, n, qa in cols) + " |"


def _in(r: dict, col: tuple) -> bool:
    """Whether record ``r`` belongs to column ``col`` (model, length, mode)."""
    return (r.get("model"), r.get("length"), r["query_aware"]) == col


def _press_rows(presses: list[dict], cols: list, cell) -> list[str]:
    """One table row per (press, ratio) that compresses; each column's text is ``cell(its records)``."""
    rows = []
    for m, ratio in sorted({(r["method"], r["compression_ratio"]) for r in presses if r["method"] != "no_press"}):
        texts = [cell([r for r in presses if r["method"] == m and r["compression_ratio"] == ratio and _in(r, col)])
                 for col in cols]
        rows.append(f"| {m} | {fmt_ratio(ratio)} | " + " | ".join(texts) + " |")
    return rows


def _needle_kept(recs: list[dict]) -> str:
    """Mean over the compressed layers and samples / the lowest layer's mean."""
    recs = [r for r in recs if r.get("needle_kept")]
    if not recs:
        return "-"
    per_layer = [sum(c) / len(c) for c in zip(*[r["needle_kept"] for r in recs])]
    return f"{sum(per_layer) / len(per_layer):.2f} / {min(per_layer):.2f}"


def _misses_explained(recs: list[dict]) -> str:
    """Of the answers scored below 1: how many had the needle mostly evicted (under half its tokens kept)."""
    missed = [r for r in recs if r["status"] == "ok" and r["score"] < 1 and r.get("needle_kept_mean") is not None]
    evicted = sum(r["needle_kept_mean"] < 0.5 for r in missed)
    return f"{evicted} evicted, {len(missed) - evicted} kept" if missed else "-"


def _needle_sections(presses: list[dict], cols: list, header: str) -> list[str]:
    """The needle-kept and misses-explained tables of the presses that compress (none without one)."""
    lines: list[str] = []
    lines += ["", ("## Needle kept (fraction of the needle's tokens in the cache at the first answer token; "
                   "mean over the compressed layers and samples / lowest layer)"), "",
              "| press | ratio " + header, "|---" * (2 + len(cols)) + "|"]
    lines += _press_rows(presses, cols, _needle_kept)
    lines += ["", ("## Misses explained (answers scored below 1: needle mostly evicted, i.e. under half of its "
                   "tokens kept on average over the compressed layers, or kept and still missed)"), "",
              "| press | ratio " + header, "|---" * (2 + len(cols)) + "|"]
    lines += _press_rows(presses, cols, _misses_explained)
    return lines


def _chunk(r: dict):
    """The record's prefill chunk size, None for one-shot prefill."""
    return r.get("prefill_chunk_size") or None


def _chunked_section(records: list[dict], cols: list, reused) -> list[str]:
    """Chunked prefill against one-shot: per press and ratio, each column's one-shot accuracy then each chunk
    size's (same model, length and mode, so the same samples)."""
    chunked = [r for r in records if _chunk(r) and not is_a3(r["method"])]
    if not chunked:
        return []
    sizes = sorted({_chunk(r) for r in chunked})
    cols = [c for c in cols if any(_in(r, c) for r in chunked)]  # question-agnostic only
    variants = [None, *sizes]
    name = (lambda m: f"{Path(str(m)).name} ") if len({c[0] for c in cols}) > 1 else (lambda m: "")
    header = " | ".join(f"{name(m)}{n} {_mode(qa)} {'one-shot' if v is None else f'chunk {v}'}"
                        for m, n, qa in cols for v in variants)
    lines = [("## Chunked prefill against one-shot (accuracy (samples) / mean cache tokens at the first answer "
              "token; the context fed in chunks of N tokens, compressed after each chunk, token order kept)"), "",
             ("no_press and A3 always prefill in one pass, and chunked cells run question-agnostic only. A chunk "
              "cache larger than one-shot's means the press skipped chunks (SnapKV and PyramidKV skip chunks no "
              "longer than their 64-token window)."), "",
             f"| press | ratio | {header} | measured |", "|---" * (3 + len(cols) * len(variants)) + "|"]
    for m, ratio in sorted({(r["method"], r["compression_ratio"]) for r in chunked}, key=lambda t: (t[0], t[1] or 0)):
        texts = []
        for col in cols:
            for v in variants:
                mine = [r for r in records if _in(r, col) and _chunk(r) == v and r["method"] == m
                        and r["compression_ratio"] == ratio]
                a, k = _accuracy(mine)
                cache = _mean([r.get("compressed_cache_tokens") for r in mine if r["status"] == "ok"])
                texts.append(f"{_f(a)} ({k}) / {_f(cache, 0)}" if a is not None else "-")
        mine = [r for r in chunked if r["method"] == m and r["compression_ratio"] == ratio]
        lines.append(f"| {m} | {fmt_ratio(ratio)} | " + " | ".join(texts) + f" | {_measured(mine, reused)} |")
    return lines + [""]


def summary_markdown(records: list[dict], title: str, command: str = "", reused=()) -> str:
    ok = sum(r["status"] == "ok" for r in records)
    n_reused = sum(r.get("key") in reused for r in records)
    lines = [f"# {title}", "", f"`{command}`" if command else "", "",
             f"{len(records)} cells: {ok} ok, {len(records) - ok} failed"
             + (f", {n_reused} reused from an earlier run (column measured)" if n_reused else "")
             + ". Scores are means over depths and keys.", ""]
    cols, header = _columns(records)
    presses = [r for r in records if not is_a3(r["method"]) and not _chunk(r)]
    if presses:
        safe = {(s["method"], s["model"], s["length"], s["query_aware"]): s for s in safe_ratios(presses)}
        names = sorted({k[0] for k in safe})
        if names:
            lines += ["## Safe ratio (largest ratio with accuracy >= 90 % of no press, same length and mode)", "",
                      "| press " + header, "|---" * (1 + len(cols)) + "|"]
            base = {c: _accuracy([r for r in presses if _in(r, c)], method="no_press") for c in cols}
            lines.append("| (no press accuracy) | " + " | ".join(
                f"{_f(a)} ({k})" if a is not None else "-" for a, k in (base[c] for c in cols)) + " |")
            for m in names:
                cells = []
                for col in cols:
                    s = safe.get((m, *col))
                    if s is None:
                        cells.append("-")
                    elif not s["no_press"]:
                        cells.append("n/a (no press 0)")
                    else:
                        cells.append(_f(s["safe_ratio"]) if s["safe_ratio"] is not None else "none")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["## Accuracy", "", "| press | ratio " + header[:-1] + "| measured |", "|---" * (3 + len(cols)) + "|"]
        for m, ratio in sorted({(r["method"], r["compression_ratio"]) for r in presses},
                               key=lambda t: (t[0] != "no_press", t[0], t[1] or 0)):
            accs = [format_score(_scores([r for r in presses if _in(r, c)], method=m, compression_ratio=ratio))
                    for c in cols]
            mine = [r for r in presses if r["method"] == m and r["compression_ratio"] == ratio]
            lines.append(f"| {m} | {fmt_ratio(ratio)} | " + " | ".join(accs) + f" | {_measured(mine, reused)} |")
        lines += ["", NOTE]
        if any(r["method"] != "no_press" for r in presses):
            lines += _needle_sections(presses, cols, header)
        lines.append("")
    lines += _chunked_section(records, cols, reused)
    fused = [r for r in records if is_a3(r["method"]) and r["status"] == "ok"]
    if fused:
        lines += ["## A3 fusion against a full prefill of the same chunks (question-agnostic)", "",
                  "| method | rate | ratio | length | n | accuracy | TTFT (ms) | TTFT / prefill | measured |",
                  "|---" * 9 + "|"]
        several = len(_models(fused)) > 1
        for model, m, rate, ratio, n in sorted(
                {(r.get("model"), r["method"], r["rate"], r["compression_ratio"], r.get("length")) for r in fused},
                key=lambda t: (str(t[0]), t[1] != PREFILL, t[1], t[2] or 0, t[3] or 0, t[4] or 0)):
            recs = [r for r in fused if (r.get("model"), r["method"], r["rate"], r["compression_ratio"],
                                         r.get("length")) == (model, m, rate, ratio, n)]
            base = _mean([r["ttft_s"] for r in fused if r["method"] == PREFILL and r.get("length") == n
                          and r.get("model") == model])
            ttft = _mean([r["ttft_s"] for r in recs])
            label = f"{Path(str(model)).name}: {m}" if several else m
            lines.append(f"| {label} | {fmt_ratio(rate)} | {fmt_ratio(ratio)} | {n} | {len(recs)} | "
                         f"{format_score([r['score'] for r in recs])} | {_f(ttft, 1, 1e3)} | "
                         f"{_f(ttft / base if base and ttft else None)} | {_measured(recs, reused)} |")
        lines += ["", NOTE, ""]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["## Failed cells", ""]
        reasons = defaultdict(list)
        for r in failed:
            label = r["method"] + (f" (chunk {_chunk(r)})" if _chunk(r) else "")
            reasons[(label, r["error"])].append(r["key"])
        for (m, err), keys in sorted(reasons.items()):
            lines.append(f"- {m} ({len(keys)} cells): {err}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_heatmaps(records: list[dict], path_prefix) -> list[Path]:
    """Per mode, one PNG: a depth x length accuracy map per method and ratio, all on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in records if r["status"] == "ok" and r.get("depth") is not None]
    for qa in sorted({r["query_aware"] for r in ok}):
        recs = [r for r in ok if r["query_aware"] == qa]
        several = len(_models(recs)) > 1
        panels = sorted({(r.get("model"), r["method"], r["compression_ratio"], r["rate"], _chunk(r)) for r in recs},
                        key=lambda t: (str(t[0]), t[1] != "no_press", t[1] != PREFILL, t[1], t[2] or 0, t[3] or 0,
                                       t[4] or 0))
        depths = sorted({r["depth"] for r in recs})
        lengths = sorted({r["length"] for r in recs})
        ncol = min(6, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(1.2 + (0.6 + 0.5 * len(lengths)) * ncol,
                                                      (0.9 + 0.3 * len(depths)) * nrow), squeeze=False)
        im = None
        for ax, (model, m, ratio, rate, chunk) in zip(axes.flat, panels):
            mine = [r for r in recs if _chunk(r) == chunk]
            grid = [[_accuracy(mine, model=model, method=m, compression_ratio=ratio, rate=rate, depth=d, length=n)[0]
                     for n in lengths] for d in depths]
            im = ax.imshow([[float("nan") if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                           cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            label = ((f"{Path(str(model)).name}: " if several else "") + m + (f" r={ratio:g}" if ratio else "")
                     + (f" rate={rate:g}" if rate is not None else "") + (f" chunk={chunk}" if chunk else ""))
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


def records_from_folders(folders) -> list[dict]:
    """The flat records (params, the cell's result, status, ``measured``) of the long-context cell files in each of
    ``folders`` (output folders of grid runs, e.g. one per model), for one report over all of them; a folder
    without such cells is :class:`~kvpress_ext.evaluation.longcontext.InputError`."""
    records = []
    for folder in folders:
        cells = [c for c in load_cells(folder) if isinstance(c.get("params"), dict)
                 and {"method", "query_aware"} <= set(c["params"]) and isinstance(c.get("key"), str)]
        if not cells:
            raise InputError(f"{folder} holds no long-context cells (<folder>/cells/*.json): pass the --output_dir "
                             "of a needle.py / ruler.py / longbench.py run")
        for c in cells:
            records.append({"key": c["key"], **c["params"], **(c.get("record") or {}), "status": c.get("status"),
                            "error": c.get("error"), "cell_seconds": c.get("wall_s"),
                            "measured": measured_date(cell_path(folder, c["key"], c["params"]))})
    return records


def write_outputs(records: list[dict], out_dir, title: str, command: str = "", reused=()) -> dict:
    """``summary.json`` (aggregated records), ``summary.md`` and ``heatmap_<mode>.png`` in ``out_dir``; the cells
    whose keys are in ``reused`` came from an earlier run and are marked with the date they were measured."""
    out_dir = claim_output_dir(out_dir)
    summary = summarize(records)
    write_output(out_dir / "summary.json", json.dumps(summary, indent=1), flag="--output_dir",
                 is_ours=lambda p: True)  # a list (no room for our mark) in the results directory claimed above
    markdown = summary_markdown(records, title, command, reused)
    write_output(out_dir / "summary.md", markdown, kind="markdown", flag="--output_dir")
    pngs = plot_heatmaps(records, out_dir / "heatmap") if any(r.get("depth") is not None for r in records) else []
    return {"summary": summary, "markdown": markdown, "heatmaps": [str(p) for p in pngs],
            "files": [str(out_dir / "summary.json"), str(out_dir / "summary.md"), *map(str, pngs)],
            "cells_dir": str(out_dir / "cells")}

