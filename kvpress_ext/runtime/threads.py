"""CPU threads for torch: one measured default for every command, and the call that applies it.

torch starts one thread per core. On a machine other jobs also use, those threads wait on each other and the
same work gets several times slower (benchmarks/threads.py: stories260k decoding 373 tok/s with one thread against
33 tok/s with two, on 2 busy cores; docs/results/threads.md). Every command therefore uses
:data:`DEFAULT_THREADS` unless ``--threads`` says otherwise, and prints the number with its timings.
"""

from __future__ import annotations

#: Torch CPU threads a command uses unless told otherwise (see the module docstring for the measurement).
DEFAULT_THREADS = 1


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch CPU threads (``None``: :data:`DEFAULT_THREADS`); returns the number now in use."""
    import torch

    torch.set_num_threads(threads or DEFAULT_THREADS)
    return torch.get_num_threads()


def threads_text(threads: int) -> str:
    """``1 CPU thread`` / ``2 CPU threads``."""
    return f"{threads} CPU thread{'' if threads == 1 else 's'}"
