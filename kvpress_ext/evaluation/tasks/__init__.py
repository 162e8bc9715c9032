"""Tasks: a sample built from a cell's plain parameters, and the score of an answer to it (``needle``: pass key,
RULER needles, multi-document QA; ``records``: RULER / LongBench data; ``prompts``: the chat prompt around a sample
and the cut a press compresses up to). Perplexity texts are loaded by :mod:`kvpress_ext.evaluation.perplexity`."""
