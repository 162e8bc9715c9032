"""Where a model's tensors live once accelerate has split it (``load_model(device_map=...)``).

Why: with a ``device_map`` the first parameter says nothing about the model. Layers sit on different GPUs, on
the CPU, or on disk; offloaded weights stay on the ``meta`` device until accelerate's hook on their module loads
them for that module's forward. Code that builds tensors itself (inputs, cache layers read from a file, A³'s
layer-by-layer recompute) asks here: the device a module computes on (:func:`execution_device`), the device
inputs go to (:func:`input_device`), each decoder layer's device (:func:`layer_devices`), and a weight's real
values even when offloaded (:func:`weight_values`). For a model on one device these are that device.
"""

from __future__ import annotations

import torch

from kvpress_ext.core.adapters import get_adapter


def _align_hooks(module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def execution_device(module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else where its tensors are."""
    for hook in _align_hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model) -> torch.device:
    """The device token ids should be on: the input embedding's execution device (a model without one: its own)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return execution_device(embeddings if embeddings is not None else model)


def layer_devices(model) -> list[torch.device]:
    """Execution device of each decoder layer, in order (where that layer's cache tensors belong)."""
    return [execution_device(layer) for layer in get_adapter(model).layers(model)]


def weight_values(module, name: str = "weight") -> torch.Tensor:
    """``module.<name>``, read from accelerate's offload store when it is on the ``meta`` device."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    for hook in _align_hooks(module):
        store = getattr(hook, "weights_map", None)
        if store is not None and name in store:
            return store[name]
    raise RuntimeError(f"{name} of {type(module).__name__} is offloaded and no offload hook holds its values.")


def parameter_values(model, name: str) -> torch.Tensor | None:
    """Parameter ``name`` of ``model`` (dotted, as ``named_parameters`` gives it) with its real values, offloaded
    or not; None when an offloaded parameter has no store that holds it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    try:
        return weight_values(module, attr)
    except RuntimeError:
        return None


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
