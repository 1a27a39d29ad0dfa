"""Fine-tuning baselines of the ROME/MEMIT papers: FT (unconstrained) and FT-L (L∞-bounded).

    edit = apply_ft(handle, requests, layer=2)             # FT: Adam on W of one layer
    edit = apply_ft_l(handle, requests, layer=2)           # FT-L: |W − W₀| ≤ ε after every step
    edit.log["max_abs_change"], edit.undo()                # bit-exact, like every editor

Only the edited matrix W of one layer (the MLP output projection that ROME and MEMIT change)
is trained, on the teacher-forced NLL of each request's target_new after its prompt (mean over
the target's tokens, then over requests), with Adam for ``num_steps`` epochs over mini-batches.
FT-L clamps W into [W₀ − ε, W₀ + ε] elementwise after each step (Zhu et al. 2020; the ROME
paper's ε = 5e-4).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from memlens.edit.hparams import HyperParams, InvalidHyperParams
from memlens.edit.layers import choose_layer, chosen_layers
from memlens.edit.outcome import measure, record_outcome
from memlens.edit.requests import EditRequest, coerce_request, validate_request
from memlens.errors import EmptyInput, MemlensError, NumericalError
from memlens.ledger import EditHandle, edit_weight_name
from memlens.offload import require_resident
from memlens.tokens import pad_id, pad_rows

FT_L_EPSILON = 5e-4  # the ROME paper's L∞ bound for FT-L


@dataclass(frozen=True)
class FTHyperParams(HyperParams):
    """FT / FT-L settings; defaults follow the ROME reference's FT hyper-parameters."""

    layer: int | None = None  # None: as ROME chooses it (causal trace, else the middle layer)
    lr: float = 5e-4  # Adam learning rate
    num_steps: int = 25  # epochs over the requests
    batch_size: int = 64  # requests per optimisation step
    weight_decay: float = 0.0  # Adam weight decay
    norm_constraint: float | None = None  # ε of FT-L (None: unconstrained FT)
    stop_loss: float = 1e-2  # stop when an epoch's mean NLL falls below this

    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def constrained(cls, handle_or_type: Any = None, **overrides: Any) -> FTHyperParams:
        """FT-L defaults: ε = 5e-4 unless ``norm_constraint`` is given."""
        return cls.for_model(handle_or_type, **{"norm_constraint": FT_L_EPSILON, **overrides})

    def check(self) -> None:
        if self.lr <= 0 or self.num_steps < 1 or self.batch_size < 1:
            raise InvalidHyperParams(f"lr > 0, num_steps ≥ 1 and batch_size ≥ 1 are required, "
                                     f"got {self.to_dict()}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise InvalidHyperParams(f"norm_constraint must be > 0 (or None for FT), got "
                                     f"{self.norm_constraint}")


def _rows(handle: Any, requests: list[EditRequest], targets: list[list[int]]
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded prompt+target ids, attention mask, and a (rows, width) mask of target labels."""
    tok = handle.tokenizer
    rows, starts = [], []
    for request, target in zip(requests, targets, strict=True):
        head = tok(request.text, add_special_tokens=True)["input_ids"]
        rows.append(head + target)
        starts.append(len(head))
    ids, mask = pad_rows(rows, pad_id(tok))
    labels = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        labels[i, s: len(r)] = True
    return ids, mask, labels


def _nll(handle: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
         ) -> torch.Tensor:
    """Mean over rows of the mean NLL of each row's label tokens (teacher forced)."""
    logits = handle.model(input_ids=ids, attention_mask=mask,
                          use_cache=False).logits[:, :-1].float()
    lp = F.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    m = labels[:, 1:].to(lp.dtype)
    return (-(lp * m).sum(1) / m.sum(1)).mean()


def ft_layer(handle: Any, requests: Sequence[EditRequest], layer: int | None,
             hparams: FTHyperParams) -> tuple[int, str]:
    """The layer FT edits and how it was chosen (:func:`~memlens.edit.layers.chosen_layers`):
    ``layer``, else ``hparams.layer``, else a causal trace of the first request (as ROME)."""
    return chosen_layers(layer, hparams.layer, lambda: choose_layer(handle, requests[0]))


def apply_ft(
    handle: Any,
    requests: EditRequest | dict[str, Any] | Sequence[EditRequest | dict[str, Any]],
    *,
    layer: int | None = None,
    hparams: FTHyperParams | None = None,
    check_current: bool = True,
    progress: bool = False,
) -> EditHandle:
    """Fine-tune W of one layer on the requests (FT; FT-L when ``hparams.norm_constraint``);
    returns the undoable edit. Requests are validated before any weight changes; a NaN/inf
    loss or weight restores the original weights and raises NumericalError.

        edit = apply_ft(handle, EditRequest("{} is a city in", "Toulouse", "Japan"), layer=2)
        edit.log["loss_last"]
        edit.undo()
    """
    started = time.perf_counter()
    hp = hparams or FTHyperParams.for_model(handle)
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    reqs = [coerce_request(r) for r in requests]
    if not reqs:
        raise EmptyInput("no edit requests given")
    targets = []
    for i, request in enumerate(reqs):
        try:
            targets.append(validate_request(handle, request, check_current=check_current))
        except MemlensError as exc:
            raise type(exc)(f"request {i}: {exc}") from None
    layer, source = ft_layer(handle, reqs, layer, hp)
    name = edit_weight_name(handle, layer)  # range check with a clear message
    batch = [t.to(handle.device) for t in _rows(handle, reqs, targets)]
    method = "ft" if hp.norm_constraint is None else "ft-l"
    require_resident(handle.model, [name], f"fine-tuning ({method}) layer {layer}")
    before = measure(handle, reqs)
    edit = EditHandle.snapshot(handle, [name], layers=[layer])
    weight = dict(handle.model.named_parameters())[name]
    original = edit.originals[name].to(weight.device)
    flags = {n: p.requires_grad for n, p in handle.model.named_parameters()}
    for p in handle.model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    try:
        losses = _fit(handle, weight, original, batch, hp, method, layer, progress)
    except BaseException:
        edit.undo(force=True)
        raise
    finally:
        for n, p in handle.model.named_parameters():
            p.requires_grad_(flags[n])
    change = (weight.detach().double() - original.double())
    edit.delta_norms[layer] = float(change.norm())
    edit.log = {
        "method": method,
        "requests": [r.to_dict() for r in reqs],
        "n_requests": len(reqs),
        "layer": layer,
        "layer_source": source,
        "hparams": hp.to_dict(),
        "epochs": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "max_abs_change": float(change.abs().max()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    edit.seal()
    return record_outcome(edit, reqs, before, edit.log, f"{method.upper()} loss")


def _fit(handle: Any, weight: torch.Tensor, original: torch.Tensor,
         batch: list[torch.Tensor], hp: FTHyperParams, method: str, layer: int,
         progress: bool) -> list[float]:
    """Adam on ``weight`` alone for up to ``hp.num_steps`` epochs over the rows (ids, mask,
    labels) of ``batch``, clamped into ``original ± hp.norm_constraint`` after every step
    (FT-L); the mean loss of each epoch. NumericalError on a NaN/inf loss or weight."""
    ids, mask, labels = batch
    n_rows = len(ids)
    optimizer = torch.optim.Adam([weight], lr=hp.lr, weight_decay=hp.weight_decay)
    losses: list[float] = []
    bar = None
    if progress:
        from memlens.stats import ProgressBar

        bar = ProgressBar(f"{method} on {n_rows} requests", hp.num_steps, 0)
    try:
        for _ in range(hp.num_steps):
            epoch = []
            for start in range(0, n_rows, hp.batch_size):
                part = slice(start, start + hp.batch_size)
                optimizer.zero_grad()
                loss = _nll(handle, ids[part], mask[part], labels[part])
                if not torch.isfinite(loss):
                    raise NumericalError(f"{method} loss became {float(loss)} at layer {layer}; "
                                         "the original weights were restored")
                loss.backward()
                optimizer.step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.clamp(weight, original - hp.norm_constraint,
                                                 original + hp.norm_constraint))
                epoch.append(float(loss.detach()) * len(ids[part]))
            losses.append(sum(epoch) / n_rows)
            if bar:
                bar.advance()
            if losses[-1] < hp.stop_loss:
                break
    finally:
        if bar:
            bar.close()
    if not torch.isfinite(weight).all():
        raise NumericalError(f"{method} produced NaN/inf weights at layer {layer}; the "
                             "original weights were restored")
    return losses


def apply_ft_l(handle: Any, requests: Any, *, layer: int | None = None,
               hparams: FTHyperParams | None = None, **kwargs: Any) -> EditHandle:
    """FT-L: :func:`apply_ft` with the L∞ bound ε = 5e-4 unless ``hparams`` sets another.

        edit = apply_ft_l(handle, requests, layer=2)
        assert edit.log["max_abs_change"] <= 5e-4
    """
    hp = hparams or FTHyperParams.constrained(handle)
    if hp.norm_constraint is None:
        hp = hp.replace(norm_constraint=FT_L_EPSILON)
    return apply_ft(handle, requests, layer=layer, hparams=hp, **kwargs)
