"""The needle-kept diagnostic: which of a needle's tokens a compressed cache still holds, per layer.

A kept entry is matched to the token it came from by mutual nearest neighbour against an uncompressed prefill of the
same tokens (keys and values; values only when the press re-rotated keys). Exact for presses that copy entries in
one prefill pass, approximate for presses that stream the prefill in chunks; presses that mask instead of evicting
(adakv) show 1.

Only the layers the press compresses are measured (:meth:`~kvpress_ext.core.adapters.base.ModelAdapter.compressed_layers`):
a layer no press touches keeps the whole prompt (Gemma 3's sliding-window layers in the evaluations' plain cache),
so counting it would lift every press's figure towards 1.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter


def token_positions(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int] | None:
    """Indices of the tokens of ``text`` that overlap any character span; None without offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


_REFERENCES: OrderedDict = OrderedDict()


@torch.no_grad()
def reference_kv(model, ids: list[int], name: str = "") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of an uncompressed prefill of ``ids`` (batch 0: heads x tokens x dim),
    memoised for the last two token sequences (the cells of one sample run one after another)."""
    key = (name, id(model), hashlib.sha1(str(ids).encode()).hexdigest())
    if key not in _REFERENCES:
        # Plain forward, outside any apply_press block: a nested position tracker would shift the positions.
        cache = DynamicCache()
        get_adapter(model).decoder(model)(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache)
        _REFERENCES[key] = [(layer.keys[0].float().cpu(), layer.values[0].float().cpu()) for layer in cache.layers]
        while len(_REFERENCES) > 2:
            _REFERENCES.popitem(last=False)
    return _REFERENCES[key]


def kept_per_layer(cache, reference, positions: list[int], values_only: bool = False,
                   exclude_last: int = 0, layers: list[int] | None = None) -> list[float]:
    """Fraction of ``positions`` (token indices of the reference) present in each of ``layers`` of ``cache``
    (default: every layer), averaged over KV heads. An entry counts as position p's when p's reference vector is nearest to it and
    it is nearest to p's reference vector among all reference tokens (mutual nearest neighbour).
    ``exclude_last``: newest cache entries that are not in the reference (the tokens fed after it)."""
    out = []
    pos = torch.tensor(positions)
    for i in range(len(cache.layers)) if layers is None else layers:
        layer, (rk, rv) = cache.layers[i], reference[i]
        k, v = layer.keys[0].float().cpu(), layer.values[0].float().cpu()
        if 0 < exclude_last < k.shape[1]:
            k, v = k[:, :-exclude_last], v[:, :-exclude_last]
        kept_vecs = v if values_only else torch.cat([k, v], -1)  # heads x n x d
        ref = rv if values_only else torch.cat([rk, rv], -1)  # heads x N x d
        target = ref[:, pos]  # heads x p x d
        nearest = torch.cdist(target, kept_vecs).argmin(-1)  # heads x p
        picked = torch.gather(kept_vecs, 1, nearest.unsqueeze(-1).expand(-1, -1, kept_vecs.shape[-1]))
        back = torch.cdist(picked, ref)  # heads x p x N
        own = back.gather(2, pos.view(1, -1, 1).expand(back.shape[0], -1, 1)).squeeze(-1)
        best = back.min(-1).values
        kept = own <= best * (1 + 1e-5) + 1e-6
        out.append(float(kept.float().mean()))
    return out

