"""Perplexity, speed and memory of a model with and without KV-cache compression.

Example (offline, on the shared tiny model):

    PYTHONPATH=$PWD python evaluation/perplexity.py --model ../shared/models/stories260k --dataset text \
        --text_file ../shared/data/tinystories_val.txt --max_eval_tokens 2048 --context_limit 512 \
        --press knorm --compression_ratio 0.5 --ppl_apply_press

The work is done in :mod:`kvpress_ext.cli.perplexity` over :mod:`kvpress_ext.evaluation.runners.perplexity`; see ``--help`` for every option.
"""

import sys

from kvpress_ext.cli.perplexity import main

if __name__ == "__main__":
    sys.exit(main())
