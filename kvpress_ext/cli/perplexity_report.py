"""The parser of ``evaluation/perplexity_report.py`` (which writes docs/results/perplexity.md from the sweeps)."""

from __future__ import annotations

import argparse

from kvpress_ext.cli.common import OneLineArgumentParser


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    ap = OneLineArgumentParser(prog="perplexity_report.py", description=description,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_dir", default="results/perplexity",
                    help="holds sweep_r0.25, sweep_r0.5, sweep_r0.75 and no_press (JSON per run)")
    ap.add_argument("--markdown", default="docs/results/perplexity.md", help="report to write")
    ap.add_argument("--plot", default="docs/results/perplexity_ratios.png", help="ratio plot to write")
    return ap.parse_args(argv)
