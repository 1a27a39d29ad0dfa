"""Weights that accelerate offloads: read, write and hash them where they really live.

A model loaded with a device map (``load_model(ref, device_map=...)``) may keep some modules
off their execution device: entries ``"disk"`` (and ``"cpu"`` next to GPUs) are *offloaded*.
accelerate then leaves their parameters on the ``meta`` device (no data) and an
``AlignDevicesHook`` loads them from its *weights map* for each forward, dropping them after.
Reading such a parameter directly gives no values and writing it changes nothing, so
everything in memlens that reads or writes weights goes through here:

    read_tensor(model, "transformer.h.2.mlp.c_proj.weight")      # its values (a copy)
    write_tensor(model, "transformer.h.2.mlp.c_proj.weight", W)   # used from the next forward on
    materialised_state_dict(model)                               # every tensor, with values
    execution_device(model.transformer.h[2])                     # where that module computes
    offloaded(model, name)                                       # True for a "disk" weight

A write into an offloaded weight is kept in the weights map's in-memory part (accelerate's
``OffloadedWeightsLoader.state_dict``, which takes priority over the copy on disk): the
checkpoint on disk is never changed, the edited matrix costs its size in CPU memory, and
writing the original back (undo) is exact. Nothing here imports accelerate: the hooks are
recognised by their attributes, so models without a device map pay nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from memlens.errors import MemlensError, OffloadedWeightError

__all__ = ["OffloadedWeightError", "execution_device", "materialised_state_dict", "offloaded",
           "read_tensor", "require_resident", "write_tensor"]


def _align_hooks(module: nn.Module) -> list[Any]:
    """The AlignDevicesHooks accelerate attached to ``module`` (inside a SequentialHook too)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in hooks if hasattr(h, "execution_device") and hasattr(h, "offload")]


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _store(weights_map: Any, key: str) -> tuple[Any, str] | None:
    """The innermost mapping that holds ``key`` of ``weights_map`` and its key there, without
    loading anything: through accelerate's PrefixedDataset to its OffloadedWeightsLoader
    (``state_dict`` in memory, ``index`` on disk) or a plain dict."""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        weights_map, key = weights_map.dataset, f"{weights_map.prefix}{key}"
    if hasattr(weights_map, "index") and hasattr(weights_map, "state_dict"):
        found = key in weights_map.state_dict or key in weights_map.index
    elif isinstance(weights_map, Mapping):
        found = key in weights_map
    else:
        found = False
    return (weights_map, key) if found else None


def _offload_source(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """(store, key) that an offloading hook loads tensor ``name`` from; None when ``name`` is
    resident (or the model has no offloading hook for it)."""
    module_path, leaf = _split(name)
    parts = module_path.split(".") if module_path else []
    for depth in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        relative = ".".join([*parts[depth:], leaf])
        for hook in _align_hooks(owner):
            if not hook.offload or hook.weights_map is None:
                continue
            if depth < len(parts) and not getattr(hook, "place_submodules", False):
                continue
            found = _store(hook.weights_map, relative)
            if found is not None:
                return found
    return None


def _source(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """:func:`_offload_source` of ``name``, else of another name of the same tensor (tied
    weights such as lm_head/wte are offloaded under one of their names)."""
    found = _offload_source(model, name)
    if found is not None:
        return found
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors |= dict(model.named_buffers(remove_duplicate=False))
    target = tensors.get(name)
    for alias, tensor in tensors.items():
        if alias != name and tensor is target:
            found = _offload_source(model, alias)
            if found is not None:
                return found
    return None


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_path, leaf = _split(name)
    try:
        owner = model.get_submodule(module_path)
    except AttributeError:
        raise MemlensError(f"the model has no tensor {name!r}") from None
    tensor = getattr(owner, leaf, None)
    if not isinstance(tensor, torch.Tensor):
        raise MemlensError(f"the model has no tensor {name!r}")
    return tensor


def offloaded(model: nn.Module, name: str) -> bool:
    """Whether tensor ``name`` (a parameter or buffer) is offloaded: its module's hook loads
    it from a weights map for each forward (device map entries "disk", or "cpu" beside GPUs)."""
    return _tensor(model, name).is_meta and _source(model, name) is not None


def _read(model: nn.Module, name: str) -> torch.Tensor:
    """The values of tensor ``name``, without copying a resident one."""
    tensor = _tensor(model, name)
    if not tensor.is_meta:
        return tensor.detach()
    found = _source(model, name)
    if found is not None:
        store, key = found
        return store[key].detach()
    raise OffloadedWeightError(f"{name} is on the meta device and no offload hook holds its "
                               "values; the model was not fully loaded")


def read_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A copy of the values of parameter or buffer ``name``, wherever they live (an
    offloaded one comes from its weights map, on the CPU)."""
    return _read(model, name).clone()


def write_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter or buffer ``name`` to ``value`` (same shape; cast to its dtype), exactly.
    A resident tensor is written in place; an offloaded one in its weights map's in-memory
    part, which the hook loads for every later forward (the copy on disk is not changed)."""
    tensor = _tensor(model, name)
    if tuple(value.shape) != tuple(tensor.shape):
        raise MemlensError(f"cannot write {name}: shape {tuple(value.shape)}, the weight is "
                           f"{tuple(tensor.shape)}")
    if not tensor.is_meta:
        with torch.no_grad():
            tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))
        return
    found = _offload_source(model, name)
    if found is None:
        raise OffloadedWeightError(
            f"cannot write {name}: it is on the meta device and no offload hook of its module "
            "holds it (a tied weight offloaded under another name?); load the model with a "
            "device map that keeps this module resident")
    store, key = found
    current = store[key]
    new = value.detach().to(dtype=current.dtype, device=current.device).clone()
    if hasattr(store, "index") and hasattr(store, "state_dict"):  # OffloadedWeightsLoader
        store.state_dict[key] = new  # takes priority over the index (the file on disk)
        if key not in store.all_keys:
            store.all_keys.append(key)
    elif isinstance(store, MutableMapping):
        store[key] = new
    else:
        raise OffloadedWeightError(f"cannot write {name}: its offloaded weights map "
                                   f"({type(store).__name__}) is read-only; load the model with "
                                   "a device map that keeps this module resident")


def require_resident(model: nn.Module, names: list[str], what: str) -> None:
    """OffloadedWeightError when one of ``names`` is offloaded (for code that trains or
    writes a parameter through autograd or in place, which an offloaded weight would ignore)."""
    gone = [n for n in names if offloaded(model, n)]
    if gone:
        modules = sorted({_split(n)[0] for n in gone})
        raise OffloadedWeightError(
            f"{what} needs {', '.join(gone)} in memory, but the device map offloads "
            f"{', '.join(modules)}; load the model with a device map that keeps these modules "
            "resident (on a GPU or, without GPUs, 'cpu'), or use ROME/MEMIT, which edit "
            "offloaded weights")


def materialised_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of ``model.state_dict()`` in sorted order, offloaded tensors read from
    their weights maps one at a time (never all in memory at once)."""
    for name, tensor in sorted(model.state_dict().items()):
        yield name, (_read(model, name) if tensor.is_meta else tensor.detach())


def execution_device(module: nn.Module, model: nn.Module | None = None,
                     name: str | None = None) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else that of
    its first tensor not on ``meta``, else the execution device of its first hooked
    submodule, else (given the ``model`` it is module ``name`` of) that of its nearest hooked
    ancestor, else the CPU. For a whole dispatched model this is where inputs go."""
    found = _own_device(module)
    if found is None and model is not None and name:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = model.get_submodule(".".join(parts[:depth]))
            found = next((_device(h.execution_device) for h in _align_hooks(ancestor)
                          if h.execution_device is not None), None)
            if found is not None:
                break
    return found or torch.device("cpu")


def _own_device(module: nn.Module) -> torch.device | None:
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return _device(hook.execution_device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    for child in module.modules():
        for hook in _align_hooks(child):
            if hook.execution_device is not None:
                return _device(hook.execution_device)
    return None


def _device(device: Any) -> torch.device:
    """accelerate's execution device (an int is a CUDA index) as a torch.device."""
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
