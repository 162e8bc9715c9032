"""The perplexity evaluation's table and sweep lines: perplexity and its change against the baseline, what the
press kept, decode speed and time to first token, with what every column means, the threads and the machine load.
The sweep's ``summary.md`` / ``summary.png`` are :mod:`kvpress_ext.evaluation.results`."""

from __future__ import annotations

import textwrap
from pathlib import Path

from kvpress_ext.evaluation import results
from kvpress_ext.runtime.threads import threads_text


def kept_summary(record: dict, bytes_per_token: int) -> dict | None:
    """What a press kept: cache entries and bytes left against the same tokens uncompressed, and the effective
    compression ratio (by bytes, so channel presses such as ThinK count too)."""
    cache = record.get("cache") or {}
    if cache.get("cache_bytes_end") is None or not cache.get("tokens_end"):
        return None
    uncompressed = cache["tokens_end"] * bytes_per_token
    fraction = cache["cache_bytes_end"] / uncompressed if uncompressed else None
    return {"cache_len": cache.get("cache_len_end"), "tokens": cache["tokens_end"], "kv_bytes": cache["cache_bytes_end"],
            "kv_bytes_uncompressed": uncompressed, "kv_fraction": fraction,
            "effective_ratio": None if fraction is None else max(0.0, 1 - fraction),
            "compressed": fraction is not None and fraction < 0.999, "measured_by": cache.get("measured_by")}


def baseline_of(records: list[dict]) -> dict | None:
    return next((r for r in records if r["press"]["name"] == "no_press" and r["status"] == "ok"), None)


def header_line(args, text_file: str | None) -> str:
    """What was measured, in one line: the model, the text and its lengths, and whether the press acted on the
    perplexity run."""
    source = Path(text_file).name if text_file else f"{args.dataset} {args.subset if args.dataset == 'wikitext' else ''}"
    tokens = f"first {args.max_eval_tokens} tokens" if args.max_eval_tokens else "all tokens"
    how = (f"perplexity under the press (text fed in chunks of {args.chunk_size} tokens)" if args.ppl_apply_press
           else "perplexity without the press (--no_ppl_press; the press acts in the speed and memory run only)")
    return f"model {args.model}; text {source.strip()} ({tokens}, windows of {args.context_limit}); {how}"


def _why_same(record: dict) -> str:
    """Why a press's perplexity equals the baseline's exactly."""
    if not record["perplexity"].get("press_applied"):
        return "the press was not applied to the perplexity run"
    if record.get("kept") and not record["kept"]["compressed"]:
        return "the press removed nothing"
    return "the press changed no prediction"


def reused_text(measured: str | None) -> str:
    """The mark of a result an earlier run computed: `` (done before) [measured 2026-12-01]``."""
    return f" (done before) [measured {measured or '?'}]"


def _mib(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def _kept_text(record: dict) -> str:
    """``248/512 (ratio 0.52)``: cache entries per layer left of the tokens seen, and the effective ratio."""
    kept = record.get("kept")
    if not kept:
        return "-"
    text = f"{kept['cache_len']}/{kept['tokens']}" if kept.get("cache_len") is not None else f"?/{kept['tokens']}"
    text += f" (ratio {kept['effective_ratio']:.2f})"
    if not kept["compressed"] and record["press"]["name"] != "no_press":
        text += " did not compress"
    return text


def _kv_text(record: dict) -> str:
    """``0.30 MiB (48 %)``: key/value bytes held, and their share of the same tokens uncompressed."""
    kept = record.get("kept")
    if not kept:
        return "-"
    return f"{_mib(kept['kv_bytes'])} ({kept['kv_fraction'] * 100:.0f} %)"


def _ppl_text(record: dict, baseline: dict | None) -> str:
    p = record.get("perplexity")
    if not p:
        return "-"
    text = f"{p['ppl']:.4f}"
    ref = (baseline or {}).get("perplexity")
    if ref and record is not baseline:
        text += f" ({(p['ppl'] / ref['ppl'] - 1) * 100:+.2f} %)"
        if p["ppl"] == ref["ppl"] and record["press"]["name"] != "no_press":
            text += f" same as baseline: {_why_same(record)}"
    return text


def format_line(record: dict, baseline: dict | None = None, reused: str | None = None) -> str:
    """One line per record with units: press, its setting, perplexity (and change against ``baseline``), the KV
    cache kept (MiB, % of the same tokens uncompressed), decode speed, time to first token; ``reused``: the date
    an earlier run measured it."""
    name, setting = record["press"]["name"], record["press"].get("setting") or "-"
    if record["status"] != "ok":
        return f"{name:26s} {record['status']}: {record.get('error')}" + (reused_text(reused) if reused else "")
    s = record.get("speed") or {}
    parts = [f"{name:26s}", setting, f"ppl {_ppl_text(record, baseline)}", f"kept {_kept_text(record)}",
             f"KV {_kv_text(record)} of uncompressed"]
    if s:
        parts.append(f"decode {s['decode_tok_per_s']:.1f} tok/s")
        if "ttft_s" in s:
            parts.append(f"TTFT {s['ttft_s'] * 1000:.1f} ms")
    return " | ".join(parts) + (reused_text(reused) if reused else "")


def format_table(records: list[dict], header: str | None = None, reused: dict | None = None) -> str:
    """The runs of one evaluation as a table (the baseline first) under ``header`` (what was measured), what every
    column means, the thread count and machine load, rows reused from an earlier run with their date, and where
    the JSON files are. ``reused``: json path -> date measured, of the rows an earlier run computed."""
    reused = reused or {}
    baseline = baseline_of(records)
    records = sorted(records, key=lambda r: r is not baseline)  # the baseline's row first
    columns = ("press", "setting", "perplexity", "kept", "KV cache", "decode", "TTFT")
    rows = []
    for r in records:
        label = r["press"]["name"] + (" (baseline)" if r is baseline and len(records) > 1 else "")
        if r.get("json_path") in reused:
            label += reused_text(reused[r["json_path"]])
        if r["status"] != "ok":
            rows.append((label, r["press"].get("setting") or "-", f"{r['status']}: {r.get('error')}", "", "", "", ""))
            continue
        s = r.get("speed") or {}
        rows.append((label, r["press"].get("setting") or "-", _ppl_text(r, baseline), _kept_text(r), _kv_text(r),
                     f"{s['decode_tok_per_s']:.1f} tok/s" if s else "-",
                     f"{s['ttft_s'] * 1000:.1f} ms" if s.get("ttft_s") is not None else "-"))
    widths = [max(len(str(row[i])) for row in [columns, *rows]) for i in range(len(columns))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [columns, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = records[0]
    p = next((r.get("perplexity") for r in records if r.get("perplexity")), None)
    s = next((r.get("speed") for r in records if r.get("speed")), None)
    kept = next((r.get("kept") for r in records if r.get("kept")), None)
    notes = []
    if p:
        how = ("every token scored from the compressed cache, text fed in chunks" if first["settings"]["ppl_apply_press"]
               else "full context, the press not applied")
        notes.append(f"perplexity: over {p['n_scored_tokens']} predicted tokens in windows of "
                     f"{first['data']['context_limit']} ({how}); in brackets the change against the baseline.")
    notes += [f"{r['press']['name']}: {r['perplexity']['note']}." for r in records if (r.get("perplexity") or {}).get("note")]
    if kept:
        notes.append(f"kept: cache entries per layer / tokens seen at the end of the {kept['measured_by']}, and the "
                     "effective compression ratio (1 - KV bytes / uncompressed bytes); KV cache: key/value bytes held "
                     "then, in MiB and as % of the same tokens uncompressed.")
    if s:
        notes.append(f"decode: greedy tokens/s after a {s['context_tokens']}-token prefill, median of {s['num_runs']} "
                     f"run{'' if s['num_runs'] == 1 else 's'}; TTFT: time to first token (prefill + first token).")
    env = first.get("environment") or {}
    if env.get("threads"):
        device = env.get("device", "cpu")
        where = threads_text(env["threads"]) if str(device).startswith("cpu") else device
        notes.append(f"Timed on {where}; {results.load_text(env.get('load_start') or {}, env.get('load_end') or {})}.")
    if reused:
        notes.append("(done before) [measured DATE]: a result an earlier run with the same settings wrote on that date; "
                     "its JSON records the threads and machine load it was timed with.")
    folders = sorted({str(Path(r["json_path"]).parent) for r in records})
    notes.append(f"JSON in {', '.join(folders)}: " + ", ".join(Path(r["json_path"]).name for r in records))
    wrapped = [textwrap.fill(note, 110, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
               for note in notes]
    return "\n".join(([header, ""] if header else []) + lines + [""] + wrapped)
