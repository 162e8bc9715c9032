"""What a press receives on GPT-NeoX: the RoPE tables and keys in the view basis must be those of the tokens' positions.

A recording press stores the ``position_embeddings`` (cos, sin), hidden states and cache keys each hook call is
handed. They are compared with tables computed here from the config alone (not from the model's or the
adapter's rotary code): in the view basis the NeoX rotary pair (i, i + r/2) sits at (i, i + D/2), so dims
``i`` and ``D/2 + i`` (i < r/2) carry ``cos/sin(position * inv_freq[i])`` and every other dim cos = 1, sin = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from kvpress import BasePress
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.positions import set_next_position


@dataclass
class RecordingPress(BasePress):
    """Records, per hook call, what kvpress presses read: layer, hidden states, RoPE tables, keys in the cache."""

    records: list = field(default_factory=list)

    def forward_hook(self, module, input, kwargs, output):
        cos, sin = kwargs["position_embeddings"]
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        self.records.append({
            "layer": module.layer_idx, "module": module, "hidden": kwargs["hidden_states"].detach(),
            "cos": cos.detach().clone(), "sin": sin.detach().clone(), "keys": layer.keys.detach().clone(),
        })
        return output


def _view_tables(config, positions: torch.Tensor):
    """Independent view-basis tables (1, n, D) for integer ``positions``, from the config's numbers only."""
    d = config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}  # transformers 5; 4.x has the plain attributes
    r = int(d * rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0)))
    base = float(rope.get("rope_theta", getattr(config, "rotary_emb_base", 10000.0)))
    assert 0 < r < d  # partial rotary really exercised (tiny_config uses rotary_pct 0.25)
    cos = torch.ones(1, len(positions), d, dtype=torch.float64)
    sin = torch.zeros(1, len(positions), d, dtype=torch.float64)
    for i in range(r // 2):
        angle = positions.double() * base ** (-2.0 * i / r)
        for dim in (i, d // 2 + i):
            cos[0, :, dim], sin[0, :, dim] = angle.cos(), angle.sin()
    return cos, sin


def _run(model, press, prompt_len=7, steps=4, jump_to=None):
    """Prefill ``prompt_len`` tokens, then decode ``steps`` tokens; ``jump_to`` moves the next position
    after the prefill (as a press that re-rotates keys does). Returns the positions each forward used."""
    ids = torch.randint(4, 120, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    positions = [torch.arange(prompt_len)]
    with torch.no_grad(), apply_press(press, model):
        out = model(input_ids=ids, past_key_values=cache)
        nxt = prompt_len
        if jump_to is not None:
            set_next_position(cache, jump_to)
            nxt = jump_to
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
            positions.append(torch.tensor([nxt]))
            nxt += 1
    return positions


def _rotate_half_rope(x, cos, sin):
    """RoPE as kvpress applies it: rotate-half pairs (i, i + D/2) over the whole head."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("jump_to", [None, 1000])
def test_press_receives_rope_tables_of_the_token_positions(tiny_models, jump_to):
    model = tiny_models["gpt_neox"]
    press = RecordingPress()
    positions = _run(model, press, jump_to=jump_to)
    n_layers = model.config.num_hidden_layers
    assert len(press.records) == n_layers * len(positions)
    for i, rec in enumerate(press.records):
        pos = positions[i // n_layers]
        cos, sin = _view_tables(model.config, pos)
        assert rec["cos"].shape == cos.shape  # the whole head, not just the rotary dims
        torch.testing.assert_close(rec["cos"].double(), cos, atol=1e-5, rtol=0)
        torch.testing.assert_close(rec["sin"].double(), sin, atol=1e-5, rtol=0)


def test_press_rope_on_view_projections_gives_the_keys_and_scores_it_is_handed(tiny_models):
    """What a kvpress press computes, RoPE by rotate-half with the tables it receives on the view's
    ``k_proj``/``q_proj``, equals the keys it is handed in the cache, and its q.k scores are the model's
    own (pre-RoPE projections rotated by the adapter's partial RoPE at the tokens' positions)."""
    model = tiny_models["gpt_neox"]
    adapter = get_adapter(model)
    press = RecordingPress()
    positions = _run(model, press, jump_to=50)
    n_layers = model.config.num_hidden_layers
    hidden_so_far: dict[int, list] = {}
    for i, rec in enumerate(press.records):
        view, hidden, layer = rec["module"], rec["hidden"], rec["layer"]
        n, d = hidden.shape[1], view.head_dim
        cos, sin = rec["cos"].unsqueeze(1), rec["sin"].unsqueeze(1)
        hidden_so_far.setdefault(layer, []).append(hidden)
        pos_so_far = torch.cat(positions[: i // n_layers + 1])
        with torch.no_grad():
            k = _rotate_half_rope(view.k_proj(hidden).view(1, n, -1, d).transpose(1, 2), cos, sin)
            q = _rotate_half_rope(view.q_proj(hidden).view(1, n, -1, d).transpose(1, 2), cos, sin)
            real = view._module
            all_hidden = torch.cat(hidden_so_far[layer], dim=1)
            k_model = adapter.apply_rope(model, adapter.prerope_keys(real, all_hidden), pos_so_far)
            q_model = adapter.apply_rope(model, adapter.prerope_queries(real, hidden), positions[i // n_layers])
        assert rec["keys"].shape[-2] == len(pos_so_far)
        torch.testing.assert_close(k, rec["keys"][:, :, -n:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q @ rec["keys"].transpose(-1, -2), q_model @ k_model.transpose(-1, -2),
                                   atol=1e-4, rtol=1e-4)
