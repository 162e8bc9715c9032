"""kvpress_ext.testing.attention_inputs: what the tests rebuild keys from must be the attention modules' real
inputs, and the hooks must go away afterwards (a leftover hook would leak into every later test)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.testing import attention_inputs, tiny_model


def test_captured_inputs_rebuild_the_cached_values_per_forward_and_hooks_are_removed():
    model = tiny_model("llama", layers=2)
    adapter = get_adapter(model)
    modules = adapter.attention_modules(model)
    ids = torch.randint(4, 120, (1, 7), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.no_grad(), attention_inputs(model) as inputs:
        model(input_ids=ids[:, :5], past_key_values=cache)
        model(input_ids=ids[:, 5:], past_key_values=cache)
    assert sorted(inputs) == [0, 1] and [len(v) for v in inputs.values()] == [2, 2]
    assert [h.shape[1] for h in inputs[1]] == [5, 2]  # one tensor per forward, in order
    for i, module in enumerate(modules):
        values = adapter.values(module, torch.cat(inputs[i], dim=1))
        torch.testing.assert_close(values, cache.layers[i].values, atol=1e-6, rtol=0)
    assert all(not m._forward_pre_hooks for m in modules)


def test_only_the_chosen_layers_and_hooks_removed_after_an_error():
    model = tiny_model("gpt_neox", layers=2)
    modules = get_adapter(model).attention_modules(model)
    with pytest.raises(RuntimeError, match="boom"), attention_inputs(model, layers=[1]) as inputs:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
        raise RuntimeError("boom")
    assert list(inputs) == [1] and inputs[1][0].shape[1] == 3
    assert all(not m._forward_pre_hooks for m in modules)
