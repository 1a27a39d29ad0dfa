"""Sparse fine-tuning of the weights the contrastive objective points at; undo bit-exact.

    mask = gradient_mask(handle, objective, fraction=0.001)        # top 0.1% |∇CO|, fixed
    edit = sparse_update(handle, objective, mask, lr=1e-5, steps=5)
    edit.undo()                                                    # bit-exact restore
    results = compare_methods(handle, mp_ids, nmp_ids)             # sparse / random / full

Stoehr et al. 2024 §5: the mask holds the global top ``fraction`` (0.1%) of |∂CO/∂θ| over the
attention Q/K/V/O and MLP in/out weight matrices (no embeddings, biases or norms), computed once
at step 0 and kept fixed; only masked entries are trained, with Adam (reference code: lr 1e-5,
L2 weight decay 1.0, 5 steps). Weight decay is applied to the masked entries only (the gradient
is masked after adding it), so every other entry stays bit-identical. Edits are recorded in
memlens' undo ledger (:class:`memlens.ledger.EditHandle`): ``undo()`` is bit-exact. Baselines: a random mask
of the same size, and full fine-tuning of all those matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from memlens.errors import InvalidArgument, NumericalError
from memlens.ledger import EditHandle
from memlens.memorization.attribute import gradients, only_these_require_grad, weight_slots
from memlens.memorization.contrastive import ContrastiveObjective
from memlens.memorization.data import PREFIX_LEN
from memlens.memorization.scan import evaluate
from memlens.offload import require_resident

Method = Literal["sparse", "random", "full"]
FRACTION = 0.001  # paper: 0.1% of the attention + MLP weights
LR = 1e-5  # reference code
WEIGHT_DECAY = 1.0  # reference code (L2, torch.optim.Adam)
STEPS = 5  # reference code's optim_steps


@dataclass
class SparseMask:
    """Boolean masks (parameter name → mask shaped like the weight) and their size."""

    masks: dict[str, torch.Tensor]
    method: str
    fraction: float
    n_selected: int
    n_total: int

    def counts(self, handle) -> list[dict[str, Any]]:
        """How many selected entries fall in each (layer, matrix)."""
        return [{"layer": s.layer, "kind": s.kind, "name": s.name,
                 "n": int(self.masks[s.name].sum())} for s in weight_slots(handle)
                if s.name in self.masks and self.masks[s.name].any()]

    def to_dict(self, handle=None) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "fraction": self.fraction,
                               "n_selected": self.n_selected, "n_total": self.n_total}
        if handle is not None:
            out["per_matrix"] = self.counts(handle)
        return out


def gradient_mask(
    handle, objective: ContrastiveObjective, *, fraction: float = FRACTION,
    method: Method = "sparse", seed: int = 0,
) -> SparseMask:
    """Mask of exactly ``round(fraction · N)`` entries (≥ 1) of the N attention/MLP weights.

    ``method="sparse"``: the largest |∂CO/∂θ| (computed now, at step 0); ``"random"``: uniformly
    random entries; ``"full"``: every entry (``fraction`` ignored).

    Example::

        mask = gradient_mask(handle, objective, fraction=0.001)
        mask.n_selected / mask.n_total     # 0.001
    """
    slots = weight_slots(handle)
    sizes = [s.param.numel() for s in slots]
    n_total = sum(sizes)
    if method == "full":
        masks = {s.name: torch.ones_like(s.param, dtype=torch.bool) for s in slots}
        return SparseMask(masks, method, 1.0, n_total, n_total)
    if not 0 < fraction <= 1:
        raise InvalidArgument(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * n_total))
    if method == "sparse":
        grads = gradients(handle, lambda m: objective(m)[0], slots)
        flat = torch.cat([grads[s.name].abs().reshape(-1).float().cpu() for s in slots])
        if not torch.isfinite(flat).all():
            raise NumericalError("the contrastive objective's gradient has NaN/inf entries; "
                                 "no mask chosen, no weights changed")
        chosen = flat.topk(k).indices
    elif method == "random":
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n_total, generator=generator)[:k]
    else:
        raise InvalidArgument(f"unknown mask method {method!r}: 'sparse', 'random' or 'full'")
    selected = torch.zeros(n_total, dtype=torch.bool)
    selected[chosen] = True
    masks, start = {}, 0
    for slot, size in zip(slots, sizes, strict=True):
        masks[slot.name] = selected[start:start + size].view(slot.param.shape).to(
            slot.param.device)
        start += size
    return SparseMask(masks, method, fraction, k, n_total)


def sparse_update(
    handle, objective: ContrastiveObjective, mask: SparseMask, *,
    lr: float = LR, steps: int = STEPS, weight_decay: float = WEIGHT_DECAY,
) -> tuple[EditHandle, list[dict[str, float]]]:
    """Minimise ``objective`` with Adam on the masked entries only; returns (edit, loss log).

    NaN/inf in the loss or the weights aborts the update, restores the weights and raises.

    Example::

        edit, log = sparse_update(handle, objective, mask, lr=1e-3, steps=10)
        ...
        edit.undo()
    """
    model = handle.model
    slots = [s for s in weight_slots(handle) if mask.masks[s.name].any()]
    params = {s.name: s.param for s in slots}
    require_resident(model, list(params), "the memorization sparse update (Adam on the weights)")
    edit = EditHandle.snapshot(handle, list(params), log={
        "method": f"memorization-{objective.mode}", "mask": mask.method,
        "n_weights": mask.n_selected, "lr": lr, "steps": steps, "weight_decay": weight_decay})
    edit.layers = sorted({s.layer for s in slots})
    masks = {s.name: mask.masks[s.name].to(s.param.dtype) for s in slots}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr, weight_decay=0.0)
    log: list[dict[str, float]] = []
    try:
        with only_these_require_grad(model, list(params.values())):
            for step in range(steps):
                optimizer.zero_grad(set_to_none=False)
                loss, parts = objective(model)
                if not math.isfinite(parts["loss"]):
                    raise NumericalError(f"the contrastive loss is {parts['loss']} at step {step}")
                loss.backward()
                with torch.no_grad():
                    for name, param in params.items():
                        param.grad.add_(param, alpha=weight_decay).mul_(masks[name])
                optimizer.step()
                log.append({"step": step, **parts})
            if not all(torch.isfinite(p).all() for p in params.values()):
                raise NumericalError("the update produced NaN/inf weights")
    except BaseException:
        edit.undo(force=True)
        raise
    finally:
        for p in params.values():
            p.grad = None
    edit.seal()
    return edit, log


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over token blocks (N, T) of held-out text."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def measure(
    handle, mp_ids: torch.Tensor, nmp_ids: torch.Tensor, *, prefix_len: int = PREFIX_LEN,
    heldout: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean EM / NLL on MP and NMP, held-out perplexity, and (editing) EM against the target."""
    model = handle.model
    mp = evaluate(model, mp_ids, prefix_len)
    nmp = evaluate(model, nmp_ids, prefix_len)
    out = {"mp_em": float(mp.em.float().mean()), "mp_nll": float(mp.nll.mean()),
           "nmp_em": float(nmp.em.float().mean()), "nmp_nll": float(nmp.nll.mean())}
    if target_ids is not None:
        from memlens.memorization.scan import exact_match_length

        out["target_em"] = float(exact_match_length(mp.continuation,
                                                    target_ids[:, prefix_len:]).float().mean())
    if heldout is not None and heldout.numel():
        out["perplexity"] = perplexity(model, heldout)
    return out


@dataclass
class UpdateResult:
    """Before/after metrics of one update method (the edit stays applied until undone)."""

    method: str
    mode: str
    lr: float
    steps: int
    weight_decay: float
    mask: SparseMask
    before: dict[str, float]
    after: dict[str, float]
    log: list[dict[str, float]]
    edit: EditHandle | None = field(default=None, repr=False)

    @property
    def took(self) -> bool:
        """Whether the update moved what it targets: unlearning raised the memorized suffixes'
        mean NLL by more than 1e-4 nats per token; editing raised the exact match with the
        perturbed continuations (``target_em``)."""
        if self.mode == "edit":
            return self.after["target_em"] > self.before["target_em"]
        return self.after["mp_nll"] - self.before["mp_nll"] > 1e-4

    def why_not(self) -> str:
        """One line with the numbers that decided :attr:`took`."""
        key = "target_em" if self.mode == "edit" else "mp_nll"
        return (f"{self.mode} with the {self.method} mask left {key} at "
                f"{self.before[key]:.4g} → {self.after[key]:.4g} (lr {self.lr}, {self.steps} steps)")

    def to_dict(self, handle=None) -> dict[str, Any]:
        return {"method": self.method, "mode": self.mode, "lr": self.lr, "steps": self.steps,
                "weight_decay": self.weight_decay, "mask": self.mask.to_dict(handle),
                "before": self.before, "after": self.after, "log": self.log, "took": self.took}


def run_update(
    handle, mp_ids: torch.Tensor, nmp_ids: torch.Tensor, *,
    method: Method = "sparse", mode: Literal["unlearn", "edit"] = "unlearn",
    pmp_ids: torch.Tensor | None = None, prefix_len: int = PREFIX_LEN,
    fraction: float = FRACTION, lr: float = LR, steps: int = STEPS,
    weight_decay: float = WEIGHT_DECAY, heldout: torch.Tensor | None = None, seed: int = 0,
    keep: bool = True, before: dict[str, float] | None = None,
) -> UpdateResult:
    """Build the CO, choose the mask, update, and measure before/after.

    With ``keep=False`` the edit is undone before returning (for comparisons). ``before``:
    the metrics of the current weights when they were measured already with the same data
    (:func:`compare_methods` measures them once for all methods).

    Example::

        result = run_update(handle, mp_ids, nmp_ids, method="sparse", lr=1e-3, steps=10)
        result.after["mp_em"], result.edit.undo()
    """
    objective = ContrastiveObjective.build(handle.model, mp_ids, nmp_ids, prefix_len=prefix_len,
                                           mode=mode, pmp_ids=pmp_ids)
    target = objective.change_ids if mode == "edit" else None
    if before is None:
        before = measure(handle, mp_ids, nmp_ids, prefix_len=prefix_len, heldout=heldout,
                         target_ids=target)
    mask = gradient_mask(handle, objective, fraction=fraction, method=method, seed=seed)
    edit, log = sparse_update(handle, objective, mask, lr=lr, steps=steps,
                              weight_decay=weight_decay)
    after = measure(handle, mp_ids, nmp_ids, prefix_len=prefix_len, heldout=heldout,
                    target_ids=target)
    if not keep:
        edit.undo()
    return UpdateResult(method, mode, lr, steps, weight_decay, mask, before, after, log, edit)


def compare_methods(
    handle, mp_ids: torch.Tensor, nmp_ids: torch.Tensor, *,
    methods: tuple[Method, ...] = ("sparse", "random", "full"), keep: Method | None = None,
    **kwargs: Any,
) -> list[UpdateResult]:
    """:func:`run_update` for each method from the same starting weights, in ``methods``'
    order; each is undone except ``keep``, which runs last and stays applied. The starting
    weights are measured once.

    Example::

        for r in compare_methods(handle, mp_ids, nmp_ids, lr=1e-3, steps=10):
            print(r.method, r.before["mp_em"], r.after["mp_em"])
    """
    by_method: dict[str, UpdateResult] = {}
    before = None
    for method in sorted(methods, key=lambda m: m == keep):  # the kept edit runs last
        result = run_update(handle, mp_ids, nmp_ids, method=method, keep=method == keep,
                            before=before, **kwargs)
        before = result.before
        by_method[method] = result
    return [by_method[m] for m in methods]


def save_model(handle, directory: str | Path, edit: EditHandle) -> Path:
    """Save the edited model to a NEW directory atomically, with ``edit_log.json``
    (:func:`memlens.edit.save.save_edited`: never the source directory, never a non-empty one).

    Example::

        result = run_update(handle, mp_ids, nmp_ids, lr=1e-3, steps=10)
        save_model(handle, "out/unlearned", result.edit); result.edit.undo()
    """
    from memlens.edit.save import save_edited

    return save_edited(handle, directory, edit, extra={"capability": "memorization"})
