"""Editing facts in weights: requests, ROME, the undo ledger and saving edited models.

    from memlens.edit import EditRequest, apply_rome, save_edited
    edit = apply_rome(handle, EditRequest("{} is a city in", "Toulouse", "Japan"))
    edit.took, edit.log["outcome"]          # did it take? (memlens.edit.outcome)
    save_edited(handle, "out/", edit)       # safetensors + tokenizer + edit_log.json
    edit.undo()
"""

from memlens.edit.hparams import HyperParams, ROMEHyperParams
from memlens.edit.ledger import EditHandle, apply_layer_deltas
from memlens.edit.requests import EditRequest, load_requests, validate_request
from memlens.edit.rome import apply_rome
from memlens.edit.save import save_edited

__all__ = ["EditHandle", "EditRequest", "HyperParams", "ROMEHyperParams", "apply_layer_deltas",
           "apply_rome", "load_requests", "save_edited", "validate_request"]
