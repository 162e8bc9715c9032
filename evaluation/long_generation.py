"""Decode-time presses (R-KV, lazy streaming, kvpress's DecodingPress) on long generation, against the full cache.

    python evaluation/long_generation.py --part nll --budgets 256 512 1024
    python evaluation/long_generation.py --model stories260k --quick --device cpu

Every option: ``--help`` (the parser is :mod:`kvpress_ext.cli.long_generation`, the runner
:mod:`kvpress_ext.evaluation.runners.long_generation`).
"""

import sys

from kvpress_ext.cli.long_generation import main

if __name__ == "__main__":
    sys.exit(main())
