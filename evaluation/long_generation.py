"""R-KV, lazy streaming and kvpress's DecodingPress on long generation: teacher-forced NLL of a
2,048-token continuation with the press compressing while decoding, and greedy generation of 1,000 tokens against
the full cache (token agreement, cache length per step). See :mod:`kvpress_ext.evaluation.long_generation`.

    PYTHONPATH=$PWD python evaluation/long_generation.py --model smollm2-135m --part nll --output_dir results/long_generation
    PYTHONPATH=$PWD python evaluation/long_generation.py --model stories260k --quick --device cpu
"""

import sys

from kvpress_ext.cli.common import command_entry
from kvpress_ext.evaluation.long_generation import main

if __name__ == "__main__":
    sys.exit(command_entry("long_generation")(main)())
