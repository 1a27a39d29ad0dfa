"""The undo ledger: every edit records the exact original matrices it changes.

    edit = apply_layer_deltas(handle, {3: delta_W}, log={"method": "rome"})
    edit.delta_norms          # {3: ‖ΔW‖_F}
    edit.undo()               # every parameter back, bit-exact; fingerprint refreshed
    with apply_rome(handle, request) as edit: ...   # undone on leaving the block

An edit is a set of changed parameters; ROME changes one matrix, MEMIT several, fine-tuning
any. Undo in reverse order of editing: undoing an edit whose matrices were changed again
afterwards raises (``force=True`` restores anyway).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from memlens.errors import MemlensError, NumericalError
from memlens.offload import read_tensor, write_tensor


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class EditHandle:
    """A reversible change of some of a model's parameters, with its log."""

    handle: Any  # the ModelHandle that was edited
    originals: dict[str, torch.Tensor]  # parameter name → exact original tensor (a clone)
    log: dict[str, Any] = field(default_factory=dict)  # requests, layer(s), hparams, norms
    delta_norms: dict[int, float] = field(default_factory=dict)  # layer → ‖ΔW‖_F
    layers: list[int] = field(default_factory=list)
    undone: bool = False
    _edited: dict[str, str] = field(default_factory=dict, repr=False)  # name → digest after edit

    @classmethod
    def snapshot(cls, handle: Any, names: Iterable[str], **kwargs: Any) -> EditHandle:
        """Record the current value of each named parameter before it is changed."""
        params = dict(handle.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise MemlensError(f"cannot record parameters {missing}: the model has no such names")
        originals = {n: read_tensor(handle.model, n) for n in names}  # offloaded ones too
        return cls(handle=handle, originals=originals, **kwargs)

    @property
    def layer(self) -> int:
        """The edited layer (for single-layer editors such as ROME)."""
        if len(self.layers) != 1:
            raise MemlensError(f"this edit changed layers {self.layers}; use .layers")
        return self.layers[0]

    @property
    def took(self) -> bool | None:
        """Whether the edit moved its requests as checked after applying it
        (``log["outcome"]``, see :mod:`memlens.edit.outcome`); None when it was not checked."""
        outcome = self.log.get("outcome")
        return None if outcome is None else bool(outcome["took"])

    def seal(self) -> None:
        """Remember the edited values, so that out-of-order undo can be detected."""
        model = self.handle.model
        self._edited = {n: _digest(read_tensor(model, n)) for n in self.originals}
        self.handle.fingerprint(refresh=True)

    def undo(self, *, force: bool = False) -> None:
        """Restore every recorded parameter bit-exact and refresh the model's fingerprint."""
        if self.undone:
            return
        model = self.handle.model
        if not force and self._edited:
            changed = [n for n, d in self._edited.items() if _digest(read_tensor(model, n)) != d]
            if changed:
                raise MemlensError(
                    f"parameters {changed} changed after this edit; undo the later edits first "
                    "(or undo(force=True) to restore this edit's originals anyway)"
                )
        for name, original in self.originals.items():
            write_tensor(model, name, original)  # in place, or into an offloaded weights map
        self.undone = True
        self.handle.fingerprint(refresh=True)

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def to_dict(self) -> dict[str, Any]:
        return {**self.log, "layers": self.layers,
                "delta_norms": {str(k): v for k, v in self.delta_norms.items()},
                "parameters": sorted(self.originals), "undone": self.undone}


def edit_weight_name(handle: Any, layer: int) -> str:
    """Parameter name of the edited matrix W of ``layer`` (e.g. transformer.h.3.mlp.c_proj.weight)."""
    return f"{handle.arch.module_name(layer, 'mlp_out')}.weight"


def apply_layer_deltas(handle: Any, deltas: dict[int, torch.Tensor],
                       log: dict[str, Any] | None = None) -> EditHandle:
    """W_l ← W_l + ΔW_l for each layer (ΔW as (d_model, d_ff)); returns the undoable edit.

    Every ΔW is checked for NaN/inf before any weight is written.
    """
    for layer, delta in deltas.items():
        if not torch.isfinite(delta).all():
            raise NumericalError(f"the update of layer {layer} contains NaN/inf; "
                                 "no weights were changed")
    arch, model = handle.arch, handle.model
    edit = EditHandle.snapshot(handle, [edit_weight_name(handle, layer) for layer in deltas],
                               log=dict(log or {}), layers=sorted(deltas))
    for layer, delta in sorted(deltas.items()):
        W = arch.get_edit_weight(model, layer)
        new = (W.double() + delta.to(device=W.device, dtype=torch.float64)).to(W.dtype)
        arch.set_edit_weight(model, layer, new)
        edit.delta_norms[layer] = float(delta.double().norm())
    edit.seal()
    return edit
