"""Read, replace or add to the input or output of any named module, with torch hooks.

    with capture(model, ["blocks.3.hook_resid_post", "transformer.h.3.mlp"]) as cache:
        model(input_ids)
    cache["blocks.3.hook_resid_post"]              # (batch, tokens, d_model)

    with edit(model, "blocks.3.hook_mlp_out", lambda out: out * 0):    # replace an activation
        model(input_ids)
    with add(model, "blocks.3.hook_mlp_out", vector, positions=[4]):   # steer one position
        model(input_ids)

A point is a TransformerLens-style hook name (see :mod:`memlens.arch`), a dotted module path
(its output), or a :class:`~memlens.arch.HookPoint` (module path + "input"/"output").
Blocks that return a tuple (transformers 5 GPT-Neo, GPT-J) and blocks that return a tensor are
handled alike: functions see and return the hidden-state tensor only. Every hook is removed on
exit from its ``with`` block, also when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from memlens.arch import HookPoint, adapter_for

Point = str | HookPoint
TensorFn = Callable[[torch.Tensor], torch.Tensor | None]


def resolve(model: nn.Module, point: Point) -> HookPoint:
    """Turn a hook name or module path into a :class:`HookPoint` of ``model``."""
    if isinstance(point, HookPoint):
        return point
    if point.startswith(("blocks.", "hook_")):
        return adapter_for(model).hook_point(point)
    return HookPoint(point, "output")


@contextmanager
def hooked(model: nn.Module, fns: Mapping[Point, TensorFn]) -> Iterator[None]:
    """Run ``fns[point](tensor)`` on each point's activation; a non-None return replaces it."""
    handles = []
    try:
        for point, fn in fns.items():
            hp = resolve(model, point)
            module = model.get_submodule(hp.module)
            if hp.side == "output":
                handles.append(module.register_forward_hook(_output_hook(fn)))
            else:
                handles.append(
                    module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True)
                )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_hook(fn: TensorFn):
    def hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = fn(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _input_hook(fn: TensorFn):
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})

    return hook


@contextmanager
def capture(
    model: nn.Module, points: Sequence[Point], *, detach: bool = True
) -> Iterator[dict[Point, torch.Tensor]]:
    """Record the activation at each point; the dict is keyed by the points as given.

    A point reached more than once (e.g. during generation) keeps its last activation.
    """
    cache: dict[Point, torch.Tensor] = {}

    def recorder(point: Point) -> TensorFn:
        def record(tensor: torch.Tensor) -> None:
            cache[point] = tensor.detach().clone() if detach else tensor

        return record

    with hooked(model, {point: recorder(point) for point in points}):
        yield cache


@contextmanager
def edit(model: nn.Module, point: Point, fn: TensorFn) -> Iterator[None]:
    """Replace the activation at ``point`` by ``fn(activation)`` for every forward pass."""
    with hooked(model, {point: fn}):
        yield


def _at_positions(positions: Sequence[int] | torch.Tensor | None,
                  new_value: Callable[[torch.Tensor], torch.Tensor]) -> TensorFn:
    """Hook fn writing ``new_value(old)`` over the activation at ``positions`` (all if None)."""
    index = slice(None) if positions is None else torch.as_tensor(positions, dtype=torch.long)

    def write(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        out[:, index] = new_value(out[:, index])
        return out

    return write


@contextmanager
def add(
    model: nn.Module,
    point: Point,
    vector: torch.Tensor,
    positions: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[None]:
    """Add ``vector`` (d,) to the activation at ``point`` at ``positions`` (all if None)."""
    with hooked(model, {point: _at_positions(
            positions, lambda old: old + vector.to(dtype=old.dtype, device=old.device))}):
        yield


@contextmanager
def replace(
    model: nn.Module,
    point: Point,
    value: torch.Tensor,
    positions: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[None]:
    """Overwrite the activation at ``point`` at ``positions`` with ``value`` (broadcast)."""
    with hooked(model, {point: _at_positions(
            positions, lambda old: value.to(dtype=old.dtype, device=old.device))}):
        yield


@contextmanager
def forwards_replaced(replacements: Sequence[tuple[nn.Module, Callable[..., object]]]
                      ) -> Iterator[None]:
    """Inside the ``with`` block each module runs its replacement instead of ``forward`` (its
    hooks still fire); on exit, also after an error, an instance-level forward the module had
    (e.g. accelerate's device hooks) is put back, else the class's forward is used again."""
    saved = [(module, module.__dict__.get("forward")) for module, _ in replacements]
    try:
        for module, forward in replacements:
            module.forward = forward
        yield
    finally:
        for module, own_forward in saved:
            if own_forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own_forward
