"""The long-generation evaluation's tables and plots: teacher-forced NLL against the full cache (with the R-KV target
check) and greedy agreement with the full cache's generation, each with what its columns mean, and where a row
was measured before when it is reused."""

from __future__ import annotations

from kvpress_ext.storage.safe_write import save_figure


def _pyplot():
    import matplotlib  # optional heavy dependency, imported only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def relative_diff(value: float, reference: float) -> float:
    """(value - reference) / |reference| in percent."""
    return 100.0 * (value - reference) / abs(reference) if reference else float("nan")


def _when(record: dict, reused: dict | None) -> str:
    """After a row reused from an earlier run: the date it was measured."""
    name = record["method"] if record.get("budget") is None else f"{record['method']}_b{record['budget']}"
    return f"  (from an earlier run, measured {reused[name]})" if reused and name in reused else ""


def nll_table(records: list[dict], target_budget: int = 512, target_pct: float = 2.0,
              reused: dict | None = None) -> tuple[str, dict | None]:
    """A text table of the NLL cells and the R-KV target check (rkv at ``target_budget`` within ``target_pct`` % of
    full's NLL), or None when either cell is missing. ``reused``: cell name -> date measured, for rows an earlier
    run computed."""
    full = next((r for r in records if r["method"] == "full"), None)
    lines = [f"{'method':<24} {'budget':>6} {'mean NLL':>9} {'vs full':>8} {'cache end':>9} {'peak':>6} {'s':>7}"]
    for r in records:
        rel = f"{relative_diff(r['mean_nll'], full['mean_nll']):+.2f}%" if full else "-"
        lines.append(f"{r['method']:<24} {r['budget'] if r['budget'] else '-':>6} {r['mean_nll']:>9.4f} {rel:>8} "
                     f"{r['cache_len_end']:>9} {r['cache_len_peak']:>6} {r['seconds']:>7.1f}{_when(r, reused)}")
    rkv = next((r for r in records if r["method"] == "rkv" and r["budget"] == target_budget), None)
    target = None
    if full and rkv:
        rel = relative_diff(rkv["mean_nll"], full["mean_nll"])
        target = {"what": f"rkv at budget {target_budget} within {target_pct} % of full's NLL",
                  "relative_diff_pct": rel, "met": abs(rel) <= target_pct}
        lines.append(f"target: {target['what']}: {rel:+.2f}% -> {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines), target


NLL_COLUMNS = ("mean NLL: mean negative log-likelihood of the continuation's tokens, each scored from the cache the "
               "press compressed while decoding; vs full: its change against the full cache; cache end / peak: cache "
               "entries per layer after the last token / the most at any step; s: seconds for the cell.")
GEN_COLUMNS = ("agreement: fraction of the full cache's greedy tokens generated identically; 1st diff: the first "
               "generated position that differs ('-': none); cache end / peak: cache entries per layer after the "
               "last generated token / the most at any step; s: seconds for the cell.")


def generation_table(records: list[dict], reused: dict | None = None) -> str:
    lines = [f"{'method':<24} {'budget':>6} {'agreement':>9} {'1st diff':>8} {'cache end':>9} {'peak':>6} {'s':>7}"]
    for r in records:
        first = "-" if r.get("first_divergence") is None else str(r["first_divergence"])
        lines.append(f"{r['method']:<24} {r['budget'] if r['budget'] else '-':>6} {r.get('agreement', 1.0):>9.3f} "
                     f"{first:>8} {r['cache_len_end']:>9} {r['cache_len_peak']:>6} {r['seconds']:>7.1f}{_when(r, reused)}")
    return "\n".join(lines)


def plot_nll(records: list[dict], path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in records:
        seg = r["segment"]
        xs = [r["context"] + (i + 0.5) * seg for i in range(len(r["segment_nll"]))]
        ax.plot(xs, r["segment_nll"], "k-" if r["method"] == "full" else "-", lw=2 if r["method"] == "full" else 1,
                label=f"{r['method']} {r['budget'] or ''}".strip())
    _finish(fig, ax, path, title, "token position (continuation)",
            f"mean NLL per {records[0]['segment'] if records else ''}-token segment")


def plot_cache(records: list[dict], path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in records:
        ax.plot(range(1, len(r["cache_len_trace"]) + 1), r["cache_len_trace"],
                "k-" if r["method"] == "full" else "-", lw=2 if r["method"] == "full" else 1,
                label=f"{r['method']} {r['budget'] or ''} (agree {r.get('agreement', 1.0):.2f})".strip())
    _finish(fig, ax, path, title, "generated tokens", "cache length (entries per layer, mean)")


def _finish(fig, ax, path, title: str, xlabel: str, ylabel: str) -> None:
    """Labels, grid and legend of both plots, then the atomic save."""
    plt = _pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
