"""Editing facts in weights: requests, ROME, the undo ledger and saving edited models.

    from memlens.edit import EditRequest, apply_rome, save_edited
    edit = apply_rome(handle, EditRequest("{} is a city in", "Toulouse", "Japan"))
    edit.took, edit.log["outcome"]          # did it take? (memlens.edit.outcome)
    save_edited(handle, "out/", edit)       # safetensors + tokenizer + edit_log.json
    edit.undo()

Modules: ``requests``, ``hparams``, ``layers`` (which layers an editor edits, one labelling),
``rome`` (+ ``compute``: k*, v₀), ``memit`` (+ ``keys``; ``optimize``, ``passes``: the δ
optimisation of both), ``finetune`` (FT, FT-L), ``outcome`` (did an edit take?), ``context``
(context templates), ``save``; and ``editors``, the table of editors by name that evaluation
and benchmarks drive. The undo record itself is core: :mod:`memlens.ledger`.
"""

from memlens.edit.hparams import HyperParams, ROMEHyperParams
from memlens.edit.requests import EditRequest, load_requests, validate_request
from memlens.edit.rome import apply_rome
from memlens.edit.save import save_edited
from memlens.ledger import EditHandle, apply_layer_deltas

__all__ = ["EditHandle", "EditRequest", "HyperParams", "ROMEHyperParams", "apply_layer_deltas",
           "apply_rome", "load_requests", "save_edited", "validate_request"]
