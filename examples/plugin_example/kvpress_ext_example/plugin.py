"""The plugin module named by the entry point: hook implementations only."""

from dataclasses import dataclass

import torch
from kvpress import ScorerPress

import kvpress_ext


@dataclass
class ValueNormPress(ScorerPress):
    """Value-norm press (example plugin): keep the tokens whose value vectors have the largest L2 norm.

    Parameters
    ----------
    compression_ratio : float
        Fraction of the KV pairs to remove, in [0, 1).
    """

    compression_ratio: float = 0.0

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        return values.norm(dim=-1)


@kvpress_ext.hookimpl
def kvpress_ext_register_presses(register):
    register("value_norm", ValueNormPress, defaults={"compression_ratio": 0.5})
