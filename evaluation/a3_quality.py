"""KL(full || fused) and top-1 agreement of A3 fusion strategies against a full prefill of the same chunks.

    python evaluation/a3_quality.py --model stories260k --samples 12 --out results/a3_quality.json \
        --plot docs/results/a3_quality.png

``--model`` takes a short name (default smollm2-135m), a local directory or a hub id; every option: ``--help``
(the parser is :mod:`kvpress_ext.cli.a3_quality`).
"""

import sys

from kvpress_ext.cli.a3_quality import main

if __name__ == "__main__":
    sys.exit(main())
