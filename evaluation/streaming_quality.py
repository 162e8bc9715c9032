"""Per-segment perplexity of StreamingLLM caches (dense, recomputed reference, eager, lazy) over a long text stream.

    python evaluation/streaming_quality.py --model stories260k --method lazy --tokens 20000
    python evaluation/streaming_quality.py --model stories260k --report

Every option: ``--help`` (the parser is :mod:`kvpress_ext.cli.streaming_quality`).
"""

import sys

from kvpress_ext.cli.streaming_quality import main

if __name__ == "__main__":
    sys.exit(main())
