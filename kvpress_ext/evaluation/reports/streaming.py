"""The streaming evaluation's report: the saved runs of :mod:`kvpress_ext.evaluation.runners.streaming` merged into
one JSON (per-segment perplexity on every target and on the reference's targets, lazy against the reference and
against eager) and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kvpress_ext.evaluation.streaming import StreamingInputError, segment_perplexity
from kvpress_ext.storage.safe_write import check_output_file, save_figure, write_output


def report(args):
    """Merge the saved runs of ``args.out_dir`` into ``args.json`` and ``args.plot``; prints the checks and where it
    wrote."""
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
        raise StreamingInputError(f"no saved run in {out}; run --method dense/reference/eager/lazy first (same --out_dir)")
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
    check_output_file(args.plot, kind="image", flag="--plot")
    write_output(args.json, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("predictions", "stopped_early", "checks")}, indent=1))
    curves = result.get("segment_ppl_reference_targets", result["segment_ppl_all_targets"])
    for m, v in curves.items():
        print(f"{m:>9}: " + " ".join(f"{x:.2f}" for x in v[:24]) + (" ..." if len(v) > 24 else ""))

    import matplotlib  # optional heavy dependency, imported only to draw

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
