"""Where a model split by accelerate computes (kvpress_ext.core.devices), read from its hooks: the execution device
of a module, of the inputs and of each layer, and an offloaded weight's real values. Stand-in hooks: the behaviour
is what accelerate's ``AlignDevicesHook`` and ``SequentialHook`` attributes say, not a split model (tests/test_offload.py
runs one)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.devices import (
    execution_device,
    input_device,
    layer_devices,
    parameter_values,
    synchronize,
    weight_values,
)


def _hook(execution_device=None, weights_map=None):
    return SimpleNamespace(execution_device=execution_device, weights_map=weights_map)


def _on_meta(module: nn.Module) -> nn.Module:
    return module.to("meta")


def test_the_hooks_execution_device_wins_over_where_the_weights_are():
    layer = nn.Linear(2, 2)
    layer._hf_hook = _hook(execution_device=1)  # accelerate gives a GPU by its index
    assert execution_device(layer) == torch.device("cuda:1")
    layer._hf_hook = _hook(execution_device="cuda:0")
    assert execution_device(layer) == torch.device("cuda:0")
    layer._hf_hook = _hook(execution_device=torch.device("cpu"))
    assert execution_device(layer) == torch.device("cpu")


def test_a_sequential_hook_is_searched_for_the_first_execution_device():
    layer = nn.Linear(2, 2)
    layer._hf_hook = SimpleNamespace(hooks=[_hook(), _hook(execution_device=2), _hook(execution_device=3)])
    assert execution_device(layer) == torch.device("cuda:2")


def test_without_a_hook_device_a_module_computes_where_its_first_real_tensor_is():
    layer = nn.Linear(2, 2)
    layer._hf_hook = _hook()  # a hook that names no device: the tensors decide
    assert execution_device(layer) == torch.device("cpu")
    meta = _on_meta(nn.Linear(2, 2))
    assert execution_device(meta) == torch.device("cpu")  # every tensor offloaded: the CPU

    class BufferOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, device="meta"))
            self.register_buffer("table", torch.zeros(1, device="meta"))
            self.register_buffer("scale", torch.zeros(1))

    assert execution_device(BufferOnly()) == torch.device("cpu")
    with torch.device("meta"):
        assert execution_device(BufferOnly()) == torch.device("cpu")  # the default device is not asked


def test_inputs_go_where_the_input_embedding_computes(tiny_models):
    model = tiny_models["llama"]
    embeddings = model.get_input_embeddings()
    embeddings._hf_hook = _hook(execution_device=3)
    try:
        assert input_device(model) == torch.device("cuda:3")
    finally:
        del embeddings._hf_hook
    assert input_device(model) == torch.device("cpu")
    bare = nn.Linear(2, 2)
    bare._hf_hook = _hook(execution_device=5)  # no input embedding: the model's own device
    assert input_device(bare) == torch.device("cuda:5")
    no_embedding = SimpleNamespace(get_input_embeddings=lambda: None, _hf_hook=_hook(execution_device=6),
                                   parameters=lambda: iter(()), buffers=lambda: iter(()))
    assert input_device(no_embedding) == torch.device("cuda:6")


def test_each_decoder_layer_has_its_own_device(tiny_models):
    model = tiny_models["llama"]
    layers = get_adapter(model).layers(model)
    layers[1]._hf_hook = _hook(execution_device=1)
    try:
        assert layer_devices(model) == [torch.device("cpu"), torch.device("cuda:1")]
    finally:
        del layers[1]._hf_hook


def test_an_offloaded_weight_is_read_from_its_hooks_store():
    layer = _on_meta(nn.Linear(2, 2))
    real = torch.ones(2, 2)
    layer._hf_hook = SimpleNamespace(hooks=[_hook(weights_map={}), _hook(weights_map={"weight": real})])
    assert weight_values(layer) is real
    assert parameter_values(nn.Sequential(layer), "0.weight") is real
    plain = nn.Linear(2, 2)
    assert weight_values(plain, "bias") is plain.bias and parameter_values(plain, "bias") is plain.bias


def test_an_offloaded_weight_without_a_store_is_an_error_or_none():
    layer = _on_meta(nn.Linear(2, 2))
    layer._hf_hook = _hook(weights_map={"bias": torch.zeros(2)})
    with pytest.raises(RuntimeError, match=r"^weight of Linear is offloaded and no offload hook holds its values\.$"):
        weight_values(layer)
    assert parameter_values(nn.Sequential(layer), "0.weight") is None
    del layer._hf_hook
    with pytest.raises(RuntimeError, match="no offload hook"):
        weight_values(layer)


def test_synchronize_waits_for_the_devices_own_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    synchronize("cpu")
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize("cuda:1")
    synchronize("mps")
    assert calls == [("cuda", torch.device("cuda:1")), ("mps", None)]


def test_hooks_without_a_device_or_a_store_are_passed_over():
    """A SequentialHook may hold hooks that are not accelerate's AlignDevicesHook (no execution_device, no
    weights_map)."""
    layer = _on_meta(nn.Linear(2, 2))
    real = torch.ones(2, 2)
    layer._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(), _hook(execution_device=4, weights_map={"weight": real})])
    assert execution_device(layer) == torch.device("cuda:4")
    assert weight_values(layer) is real
