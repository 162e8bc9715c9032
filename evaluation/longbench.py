"""LongBench (hub or --data_file) for every press and A3 fusion, scored with each task's metric.

Every option: `python evaluation/longbench.py --help` (the parser is :mod:`kvpress_ext.cli.longcontext`).
"""

import sys

from kvpress_ext.cli.longcontext import longbench_main as main

if __name__ == "__main__":
    sys.exit(main())
