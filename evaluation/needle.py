"""Needle in a haystack (pass key, RULER needles, multi-document QA) for every press and A3 fusion.

Every option: `python evaluation/needle.py --help` (the parser is :mod:`kvpress_ext.cli.longcontext`).
"""

import sys

from kvpress_ext.cli.longcontext import needle_main as main

if __name__ == "__main__":
    sys.exit(main())
