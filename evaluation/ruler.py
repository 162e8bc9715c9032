"""RULER-style retrieval (built-in needles or a --data_file JSONL) for every press and A3 fusion.

Every option: `python evaluation/ruler.py --help` (the parser is :mod:`kvpress_ext.cli.longcontext`).
"""

import sys

from kvpress_ext.cli.longcontext import ruler_main as main

if __name__ == "__main__":
    sys.exit(main())
