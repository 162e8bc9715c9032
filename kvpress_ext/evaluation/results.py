"""Result files of the evaluation scripts: one JSON per run, plus ``summary.md`` / ``summary.png`` for sweeps."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.sweep import load_cells
from kvpress_ext.storage.inputs import load_json
from kvpress_ext.storage.safe_write import check_output_dir, claim_output_dir, json_safe, save_figure, write_output


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "kvpress", "kvpress-ext", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding this file (with ``-dirty`` if it has local changes), or None.

    Read once per process and folder: the code that runs is the code imported at the start, so a long sweep
    records that commit even if the checkout moves on while it runs."""
    return _git_commit(str(Path(path or __file__).resolve().parent))


@functools.cache
def _git_commit(folder: str) -> str | None:
    cwd = Path(folder)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device) -> dict:
    device = torch.device(device)
    info = {"device": str(device), "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def measured_date(path) -> str | None:
    """The UTC date (``2026-12-01``) a result file was written, or None if it is missing: what a report prints
    beside a result reused from an earlier run."""
    try:
        return time.strftime("%Y-%m-%d", time.gmtime(Path(path).stat().st_mtime))
    except OSError:
        return None


def machine_load() -> dict:
    """The machine's load average (1 and 5 minutes) against its CPU count, and whether it was busy: timings taken
    while other processes ran (load average at or above half the CPUs) are not comparable with idle ones."""
    cpus = os.cpu_count() or 1
    try:
        one, five, _ = os.getloadavg()
    except (OSError, AttributeError):  # not available on this platform
        return {"loadavg_1m": None, "loadavg_5m": None, "cpu_count": cpus, "busy": None}
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "cpu_count": cpus, "busy": one >= cpus / 2}


def load_text(start: dict, end: dict) -> str:
    """``load average 1.3 -> 2.1 on 2 CPUs (busy)`` for a start and end :func:`machine_load`."""
    if start.get("loadavg_1m") is None:
        return "load average unknown"
    if end.get("loadavg_1m") is None:
        end = start
    busy = start.get("busy") or end.get("busy")
    return (f"load average {start['loadavg_1m']:.1f} -> {end['loadavg_1m']:.1f} on {start['cpu_count']} CPUs "
            f"({'busy: timings slowed by other processes' if busy else 'idle'})")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")[:120]


def run_filename(record: dict) -> str:
    press = record["press"]
    params = press.get("params") or {}
    parts = [record["data"]["dataset"], press["name"]]
    parts += [f"{k}={v}" for k, v in sorted(params.items()) if v is not None and not isinstance(v, (dict, list))]
    if record.get("mode"):
        parts.append(record["mode"])
    return _slug("__".join(str(p) for p in parts)) + ".json"


def write_json(record: dict, output_dir: str | Path) -> Path:
    """Write one run's record into ``output_dir`` (missing, empty or ours: :func:`kvpress_ext.storage.safe_write.claim_output_dir`).

    A record carrying its sweep's ``setting`` (:func:`setting_digest`) is written under a name holding it, so two
    sweeps of other settings in one folder keep their own files instead of replacing each other's."""
    out = claim_output_dir(output_dir)
    name = run_filename(record)
    if record.get("setting"):
        name = f"{name[:-len('.json')]}.{_slug(str(record['setting']))}.json"
    return write_output(out / name, json.dumps(json_safe(record), indent=2) + "\n", flag="--output_dir")


def _fmt(x, spec):
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


#: What every column of ``summary.md`` means (written under the table).
SUMMARY_COLUMNS = {
    "press": "registry name (`kvpress-ext describe NAME`).",
    "setting": "how it was asked to compress: the ratio, or the token budget it was given (budget presses are sized "
               "from the sweep's ratio).",
    "ppl": "perplexity over the scored tokens (with --ppl_apply_press every token is predicted from the compressed "
           "cache; otherwise the press only affects the speed run).",
    "Δ ppl": "change against no_press in the same sweep.",
    "kept": "cache entries per layer left / tokens seen at the end of the run, and the effective compression ratio "
            "(1 - KV bytes / uncompressed bytes).",
    "KV": "key/value bytes held at the end, in MiB and as % of the same tokens uncompressed; *did not compress* marks "
          "presses that kept every byte.",
    "decode": "greedy decoding speed after the prefill, tokens/s (median of the timed runs).",
    "TTFT": "time to first token: prefill plus the first token, ms.",
    "status": "ok; unsupported (cannot run in this mode, found before the sweep), skipped (needs something not "
              "available here) or failed, with the reason.",
}


def _uncompressed_bytes(record: dict, reference: int | None) -> int | None:
    kept = record.get("kept") or {}
    return kept.get("kv_bytes_uncompressed") or reference


def summary_rows(records: list[dict]) -> list[dict]:
    """One dict per record for the summary table and plots (older records without ``kept``/``setting`` work too:
    the uncompressed size is then no_press's)."""
    reference = next(((r.get("cache") or {}).get("cache_bytes_end") for r in records
                      if r["press"]["name"] == "no_press" and r.get("status", "ok") == "ok"), None)
    ref_ppl = next(((r.get("perplexity") or {}).get("ppl") for r in records
                    if r["press"]["name"] == "no_press" and r.get("status", "ok") == "ok"), None)
    rows = []
    for r in records:
        ppl, speed, kept = r.get("perplexity") or {}, r.get("speed") or {}, r.get("kept") or {}
        kv = (r.get("cache") or {}).get("cache_bytes_end")
        full = _uncompressed_bytes(r, reference)
        fraction = kv / full if kv is not None and full else None
        ratio = r["press"].get("compression_ratio")
        rows.append({
            "press": r["press"]["name"], "ratio": ratio,
            "setting": r["press"].get("setting") or ("-" if ratio is None else f"compression_ratio={ratio}"),
            "params": r["press"].get("params") or {}, "ppl": ppl.get("ppl"), "loss": ppl.get("loss"),
            "ppl_change": ppl["ppl"] / ref_ppl - 1 if ppl.get("ppl") is not None and ref_ppl else None,
            "kv_bytes": kv, "kv_fraction": fraction,
            "cache_len": kept.get("cache_len", (r.get("cache") or {}).get("cache_len_end")), "tokens": kept.get("tokens"),
            "did_not_compress": r["press"]["name"] != "no_press" and fraction is not None and fraction >= 0.999,
            "decode_tok_per_s": speed.get("decode_tok_per_s"), "ttft_s": speed.get("ttft_s"),
            "status": r.get("status", "ok"), "error": r.get("error"),
        })
    return rows


def _kept_cell(row: dict) -> str:
    if row["kv_fraction"] is None:
        return ""
    entries = f"{row['cache_len']}/{row['tokens']} " if row.get("tokens") else ""
    return f"{entries}(ratio {max(0.0, 1 - row['kv_fraction']):.2f})"


def _kv_cell(row: dict) -> str:
    if row["kv_bytes"] is None:
        return ""
    text = f"{row['kv_bytes'] / 2**20:.2f}"
    if row["kv_fraction"] is not None:
        text += f" ({row['kv_fraction'] * 100:.0f} %)"
    return text + (" *did not compress*" if row["did_not_compress"] else "")


def write_summary(records: list[dict], output_dir: str | Path, title: str = "Perplexity sweep",
                  command: str | None = None) -> tuple[Path, Path | None]:
    """``summary.md`` (one row per run, what each column means, skipped/unsupported/failed presses with their
    reason) and ``summary.png``."""
    out = claim_output_dir(output_dir)
    rows = summary_rows(records)
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| press | setting | ppl | Δ ppl | kept | KV MiB (% of uncompressed) | decode tok/s | TTFT (ms) | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        status = row["status"] if not row["error"] else f"{row['status']}: {str(row['error'])[:160]}"
        change = "" if row["ppl_change"] is None or row["press"] == "no_press" else f"{row['ppl_change'] * 100:+.2f} %"
        ttft = None if row["ttft_s"] is None else row["ttft_s"] * 1000
        lines.append(
            f"| {row['press']} | {row['setting'].replace('|', '/')} | {_fmt(row['ppl'], '.4f')} | {change} "
            f"| {_kept_cell(row)} | {_kv_cell(row)} | {_fmt(row['decode_tok_per_s'], '.1f')} "
            f"| {_fmt(ttft, '.1f')} | {status.replace('|', '/')} |"
        )
    lines += ["", "Columns:", ""] + [f"- **{k}**: {v}" for k, v in SUMMARY_COLUMNS.items()]
    environment = next((r.get("environment") for r in records if r.get("environment")), None) or {}
    if environment.get("threads") or environment.get("load_start"):
        end = next((r["environment"]["load_end"] for r in reversed(records)  # failed cells record no environment
                    if (r.get("environment") or {}).get("load_end")), {})
        timed = (f"Timed with {environment.get('threads', '?')} CPU thread(s) on {environment.get('device', '?')}; "
                 f"{load_text(environment.get('load_start') or {}, end)}.")
        lines += ["", timed]
    md = write_output(out / "summary.md", "\n".join(lines) + "\n", kind="markdown", flag="--output_dir")
    return md, _plot(rows, out / "summary.png", title)


_COLORS = 10
_MARKERS = "osD^v<>pPX*h"


def line_style(i: int) -> tuple[int, str]:
    """(colour index in tab10, marker) of the i-th line: pairs differ for up to 10 x len(_MARKERS) lines, and
    consecutive lines differ in both, so 20+ lines stay tellable apart."""
    return i % _COLORS, _MARKERS[(i // _COLORS + i) % len(_MARKERS)]


def _not_run_text(rows: list[dict]) -> str:
    """The presses that did not run, one per line, for a panel beside a figure."""
    missing = [r for r in rows if r["status"] != "ok" or r["ppl"] is None]
    if not missing:
        return ""
    lines = [f"Not run ({len(missing)}):"]
    for r in missing:
        reason = str(r["error"] or "no perplexity").split(": ", 1)[-1]
        lines.append(f"{r['press']} ({r['status']}): {reason[:60]}{'...' if len(reason) > 60 else ''}")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> Path | None:
    ok = [r for r in rows if r["status"] == "ok" and r["ppl"] is not None]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["press"] for r in ok})
    if len(names) == len(ok) and len(ok) > 1:  # one point per press (a `--press all` sweep): ranked
        return _plot_ranked(ok, rows, path, title, plt)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        pts = sorted((r for r in ok if r["press"] == name), key=lambda r: r["kv_bytes"] or 0)
        color, marker = line_style(i)
        kw = {"color": cmap(color), "label": name, "marker": marker, "ms": 5}
        axes[0].plot([(p["kv_bytes"] or 0) / 1024 for p in pts], [p["ppl"] for p in pts], **kw)
        tps = [p for p in pts if p["decode_tok_per_s"] is not None]
        if tps:
            axes[1].plot([(p["kv_bytes"] or 0) / 1024 for p in tps], [p["decode_tok_per_s"] for p in tps], **kw)
    ref = next((r["ppl"] for r in ok if r["press"] == "no_press"), None)
    if ref is not None:
        axes[0].axhline(ref, color="k", ls="--", lw=1, label=f"uncompressed ({ref:.3f})")
    axes[0].set(xlabel="KV cache at end (KiB)", ylabel="perplexity (axis starts at the data, not 0)",
                title="perplexity vs cache size", yscale="log")
    axes[1].set(xlabel="KV cache at end (KiB)", ylabel="decode tokens/s", title="decode throughput")
    (axes[1] if axes[1].lines else axes[0]).legend(fontsize=7, ncol=2, loc="best")
    return _finish(fig, title, rows, path, plt)


def _finish(fig, title: str, rows: list[dict], path: Path, plt) -> Path:
    """Title, layout, the panel of presses that did not run (from ``rows``), then the figure saved and closed."""
    fig.suptitle(title)
    fig.tight_layout()
    text = _not_run_text(rows)
    if text:
        fig.text(1.0, 0.95, text, ha="left", va="top", fontsize=7, family="monospace", transform=fig.transFigure)
    save_figure(fig, path, flag="--output_dir", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_ranked(rows: list[dict], all_rows: list[dict], path: Path, title: str, plt) -> Path:
    """Presses ranked by perplexity as dots on an axis that starts where the data does (bars from 0 would hide the
    differences), with the uncompressed value as a dashed line; presses that did not compress drawn hollow and
    labelled; next to it their decode speed; the presses that did not run listed beside the figure."""
    rows = sorted(rows, key=lambda r: r["ppl"])
    names = [r["press"] + ("  (did not compress)" if r["did_not_compress"] else "") for r in rows]
    y = list(range(len(rows)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.28 * len(rows) + 1.8), sharey=True,
                               gridspec_kw={"width_ratios": [3, 2]})
    ref = next((r["ppl"] for r in rows if r["press"] == "no_press"), None)
    for i, r in enumerate(rows):
        color = "0.45" if r["press"] == "no_press" else ("0.6" if r["did_not_compress"] else "tab:blue")
        face = "none" if r["did_not_compress"] else color
        if ref is not None:
            a.plot([ref, r["ppl"]], [i, i], color=color, lw=1, alpha=0.5)
        a.plot([r["ppl"]], [i], "o", color=color, mfc=face, ms=6)
        kib = f"  {r['kv_bytes'] / 1024:.0f} KiB" if r["kv_bytes"] is not None else ""
        a.text(r["ppl"], i, f"  {r['ppl']:.3f}{kib}", va="center", fontsize=7)
    values = [r["ppl"] for r in rows] + ([ref] if ref is not None else [])
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) or 0.01 * hi
    a.set_xlim(lo - pad, hi + 4 * pad)
    if ref is not None:
        a.axvline(ref, color="k", ls="--", lw=1, label=f"uncompressed (no_press) {ref:.3f}")
        a.legend(fontsize=8, loc="lower right")
    a.set(yticks=y, yticklabels=names, xlabel="perplexity (lower is better; axis starts at the data, not 0)",
          title="perplexity")
    a.invert_yaxis()
    b.barh(y, [r["decode_tok_per_s"] or 0 for r in rows],
           color=["0.45" if r["press"] == "no_press" else "0.6" if r["did_not_compress"] else "tab:blue" for r in rows])
    b.set(xlabel="decode tokens/s", title="decode throughput")
    return _finish(fig, title, all_rows, path, plt)


_PER_CELL = ("press", "compression_ratio", "press_kwargs")  # what differs between the cells of one sweep


def sweep_setting(params: dict) -> dict:
    """What the cells of one perplexity sweep share (a cell's ``config`` less press, ratio and press parameters)."""
    return {k: v for k, v in params["config"].items() if k not in _PER_CELL}


def setting_digest(params: dict) -> str:
    """8 hex digits of a cell's :func:`sweep_setting` and inputs (model and text digests): equal for the cells of
    one sweep, different for a sweep of other options or inputs."""
    text = json.dumps([sweep_setting(params), params.get("inputs")], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _refuse_mixed(path, count: int, differ: str) -> None:
    raise KVPressExtError(f"{path} holds sweeps with {count} different settings (they differ in {differ}); their "
                          "numbers are not comparable: pass each sweep its own --output_dir, or summarize one of them "
                          "from its own folder.")


def records_from_cells(path: str | Path) -> list[dict]:
    """Perplexity records from the sweep cell files under ``path/cells`` (:mod:`kvpress_ext.evaluation.sweep`); a failed
    cell becomes a record with its press, ratio and reason. Readable while the sweep is still running."""
    records, settings = [], {}
    for cell in load_cells(path):
        params = cell.get("params") if isinstance(cell.get("params"), dict) else {}
        if not isinstance(params.get("config"), dict):
            continue  # another command's cell (an icl grid sharing the folder): not a perplexity record
        settings.setdefault(setting_digest(params), sweep_setting(params))
        if cell.get("status") == "ok" and cell.get("record"):
            records.append(cell["record"])
            continue
        config = (cell.get("params") or {}).get("config") or {}
        records.append({"press": {"name": config.get("press", cell.get("key")),
                                  "compression_ratio": config.get("compression_ratio"), "params": {}},
                        "status": cell.get("status", "failed"), "error": cell.get("error"),
                        "data": {"dataset": config.get("dataset")}, "command": (cell.get("params") or {}).get("_command")})
    if len(settings) > 1:
        a, b = list(settings.values())[:2]
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["model or text contents, threads"]
        _refuse_mixed(path, len(settings), ", ".join(differ))
    return records


def run_records(path) -> list[dict]:
    """The per-run JSON files of ``path`` that are perplexity records (summaries, other commands' files and files
    beyond the JSON reader's bounds are passed over)."""
    out = []
    for p in sorted(Path(path).glob("*.json")):
        try:
            r = load_json(p.read_bytes(), str(p))
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and isinstance(r.get("press"), dict) and isinstance(r["press"].get("name"), str):
            out.append(r)
    settings = {r.get("setting") for r in out}
    if len(settings) > 1:  # files of two sweeps (older files, without a setting, count as one more)
        _refuse_mixed(path, len(settings), "options or inputs; each run file's name ends with its setting")
    return out


def summarize_directory(path: str | Path, title: str = "Perplexity sweep") -> tuple[Path, Path | None]:
    """Rebuild ``summary.md``/``summary.png`` from the cell files of a sweep (finished, interrupted or still
    running), or from the per-run JSON files of a directory written before sweeps had cell files."""
    check_output_dir(path, flag="--summarize")
    records = records_from_cells(path) or run_records(path)
    if not records:
        raise KVPressExtError(f"--summarize {path} holds no perplexity results; pass the --output_dir of a "
                              "perplexity run.")
    records.sort(key=lambda r: (r.get("status") != "ok", r["press"]["name"]))
    return write_summary(records, path, title=title, command=records[0].get("command"))


def ratio_table(directories: dict) -> str:
    """Markdown table: one row per press, ppl / KV bytes / decode tok/s per ratio, from sweep directories
    given as ``{ratio: path}``; presses that were skipped or failed are listed with their reason below it."""
    by_press: dict = {}
    notes: dict = {}
    for ratio, path in directories.items():
        for r in run_records(path):
            name = r["press"]["name"]
            if r.get("status") != "ok":
                notes.setdefault(name, f"{r.get('status')}: {str(r.get('error'))[:140]}")
                continue
            by_press.setdefault(name, {})[ratio] = r
    ratios = list(directories)
    head = "| press | " + " | ".join(f"ppl @{x}" for x in ratios) + " | " + \
        " | ".join(f"KV bytes @{x}" for x in ratios) + " | " + " | ".join(f"tok/s @{x}" for x in ratios) + " |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(ratios))]
    for name in sorted(by_press, key=lambda n: (n != "no_press", n)):
        runs = by_press[name]
        cells = [_fmt((runs.get(x) or {}).get("perplexity", {}).get("ppl"), ".4f") for x in ratios]
        cells += [_fmt((runs.get(x) or {}).get("cache", {}).get("cache_bytes_end"), ",d") for x in ratios]
        cells += [_fmt((runs.get(x) or {}).get("speed", {}).get("decode_tok_per_s"), ".1f") for x in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Not run:", ""]
        lines += [f"- `{n}`: {why.replace('|', '/')}" for n, why in sorted(notes.items()) if n not in by_press]
    return "\n".join(lines) + "\n"


def plot_ratio_sweeps(directories: dict, path: str | Path, title: str = "Perplexity against compression ratio") -> Path:
    """Perplexity of every press whose result depends on the ratio, one line per press across the sweep
    directories ``{ratio: path}``, with the uncompressed value as a dashed line. A run that records its own
    ``compression_ratio`` is placed there, so one directory holding a multi-ratio sweep may be given for every
    ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict = {}
    for ratio, d in directories.items():
        for r in run_records(d):
            if r.get("status") == "ok" and (r.get("perplexity") or {}).get("ppl") is not None:
                own = r["press"].get("compression_ratio")
                runs.setdefault(r["press"]["name"], {})[float(ratio if own is None else own)] = r["perplexity"]["ppl"]
    ref = next(iter(runs.get("no_press", {}).values()), None)
    varying = {n: v for n, v in runs.items() if len(v) > 1 and max(v.values()) - min(v.values()) > 1e-6}
    ranked = sorted(varying, key=lambda n: max(varying[n].values()))
    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(ranked):
        pts = sorted(varying[name].items())
        color, marker = line_style(i)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, color=cmap(color),
                label=name, lw=2.2 if name in ("lazy_streaming", "rkv") else 1.2)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1, label=f"no compression ({ref:.3f})")
    ax.set(xlabel="compression ratio (fraction of the KV cache removed)", ylabel="perplexity", title=title)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
