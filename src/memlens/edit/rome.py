"""ROME: Rank-One Model Editing (Meng et al. 2022, §3).

    edit = apply_rome(handle, {"prompt": "{} is a city in", "subject": "Toulouse",
                               "target_new": "Japan"})
    edit.layer, edit.delta_norms, edit.log        # where, how much, everything else
    edit.undo()                                   # bit-exact

The update inserts the pair (k*, v*) into W of layer l*:

    W ← W + (v* − W k* − b) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)

so that afterwards W k* + b = v*. k* is the key averaged over context templates; C = E[k kᵀ]
comes from :mod:`memlens.stats`. That is ``update="mean"``; ``"legacy"`` reproduces the
reference code, which inserts (k_bare, v*) with the key k_bare of the bare prompt in numerator
and denominator, and ``"both"`` adds δ = v* − W k* − b at k* and at k_bare alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memlens.edit.compute import Keys, compute_k_star, mlp_output_of
from memlens.edit.context import context_templates
from memlens.edit.hparams import ROME_UPDATES, ROMEHyperParams
from memlens.edit.layers import choose_layer, chosen_layers
from memlens.edit.optimize import DeltaObjective, DeltaResult, optimize_deltas
from memlens.edit.outcome import measure, record_outcome
from memlens.edit.requests import EditRequest, coerce_request, validate_request
from memlens.errors import MemlensError, NumericalError
from memlens.ledger import EditHandle, apply_layer_deltas
from memlens.stats import KeyStats, layer_stats


def rome_layer(handle: Any, requests: Sequence[EditRequest], layer: int | None,
               hparams: ROMEHyperParams) -> tuple[int, str]:
    """The layer ROME edits and how it was chosen (:func:`~memlens.edit.layers.chosen_layers`):
    ``layer``, else ``hparams.layer``, else a causal trace of the first request."""
    return chosen_layers(layer, hparams.layer, lambda: choose_layer(handle, requests[0]))


def left_vector(C: torch.Tensor | None, k: torch.Tensor, layer: int, *,
                overwrite_c: bool = False) -> torch.Tensor:
    """u = C⁻¹ k in float64 (Cholesky solve) for k (d_ff,) or several keys (d_ff, m); k itself
    when C is None. With ``overwrite_c`` a float64 C on k's device is factored in its own
    buffer, which then holds the factor, not C: no second d_ff² buffer (1.6 GB at
    Llama-3-8B's d_ff). Units that never fire on the statistics corpus (dead units of a TopK
    layer) leave zero rows and columns in C: the solve runs on the live units, u is 0 on the
    dead ones."""
    k = k.double()
    if C is None:
        return k
    given = C
    C = C.to(k.device, torch.float64)
    live = C.diagonal() > 0
    rhs = k if k.dim() == 2 else k[:, None]
    if not live.all() and live.any():
        A = C[live][:, live]  # a new buffer
        rhs = rhs[live.to(rhs.device)]
    elif overwrite_c or C is not given:  # C is ours to overwrite
        A = C
    else:
        A = C.clone()
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(A, out=(A, info))
    if not live.any() or int(info) != 0:
        raise NumericalError(
            f"the key second moment C of layer {layer} is not positive definite (too few or "
            "too repetitive corpus samples for its d_ff); collect statistics over more "
            "samples, or set mom2_adjustment=False; no weights were changed")
    solved = torch.cholesky_solve(rhs, A)  # from A's lower factor
    if not live.all():
        u = torch.zeros(k.shape[0], solved.shape[1], dtype=torch.float64, device=k.device)
        u[live.to(k.device)] = solved.to(k.device)
        solved = u
    return solved if k.dim() == 2 else solved.squeeze(1)


@dataclass
class RankOneUpdate:
    """ΔW = right ⊗ left / denominator, as (d_model, d_ff)."""

    left: torch.Tensor  # the input direction (d_ff,), float64: u = C⁻¹k* or w (update "both")
    right: torch.Tensor  # the output change (d_model,), float64
    denominator: float  # so that ΔW k = right for the inserted key(s) k

    @property
    def delta(self) -> torch.Tensor:
        return torch.outer(self.right, self.left) / self.denominator


# How the rank-one update uses the keys (``ROMEHyperParams.update``, one of ROME_UPDATES):
# "mean"   — insert (k*, v*): ΔW k* = v* − W k* − b, k* the key averaged over context
#            templates in both places (r-ROME's consistent form);
# "legacy" — the reference code: the bare prompt's key in numerator and denominator,
#            ΔW k_bare = v* − W k_bare − b, direction still C⁻¹k*;
# "both"   — ΔW = δ wᵀ with δ = v* − W k* − b and w the C-metric minimum-norm vector with
#            wᵀk* = wᵀk_bare = 1: the edit adds the optimised δ both at the averaged key and at
#            the bare prompt's key (where CounterFact's rewrite prompt reads it).

def compute_v_star(handle: Any, request: EditRequest, layer: int, templates: list[str],
                   keys: Keys, hparams: ROMEHyperParams, target: list[int]) -> DeltaResult:
    """v* = v₀ + δ (ROME eq. 4) with v₀ = W k* + b; δ is added to the MLP output at the fact
    token and minimises NLL(target_new | templated prompts) + kl_factor · KL(edited ‖ original)
    on "{s} is a" + v_weight_decay · ‖δ‖/‖v₀‖², with ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ — the same
    objective as MEMIT's z, so it is :func:`optimize_deltas` for one fact (``.target[0]`` = v*).
    """
    v0 = mlp_output_of(handle, layer, keys.k_star)
    return optimize_deltas(handle, f"blocks.{layer}.hook_mlp_out", [request], [target], templates,
                           v0[None], DeltaObjective.from_hparams(hparams), max_batch_tokens=0)


def rank_one_update(handle: Any, layer: int, keys: Keys, v_star: torch.Tensor,
                    C: torch.Tensor | None, *, update: str = "mean",
                    overwrite_c: bool = False) -> RankOneUpdate:
    """The ROME update of ``layer`` from k*, v* and C (None: identity, no covariance); see
    the comment above for the three forms (``ROME_UPDATES``). C is factored once, in its own
    buffer with ``overwrite_c`` (:func:`left_vector`)."""
    if update not in ROME_UPDATES:
        raise ValueError(f"unknown ROME update {update!r}; choose one of {', '.join(ROME_UPDATES)}")
    k_star = keys.k_star.double()
    if update == "both":  # C⁻¹ [k*, k_bare] in one solve
        CinvK = left_vector(C, torch.stack([keys.k_star, keys.k_bare], 1), layer,
                            overwrite_c=overwrite_c)
        u = CinvK[:, 0]
    else:
        u = left_vector(C, keys.k_star, layer, overwrite_c=overwrite_c)  # C⁻¹ k*
    k_insert = keys.k_bare.double() if update == "legacy" else k_star
    v_current = mlp_output_of(handle, layer, k_insert.float()).double()  # W k + b
    right = v_star.double().to(v_current.device) - v_current
    left, denominator = u, float(u @ k_insert.to(u.device))
    if update == "both":
        left, denominator = _two_key_direction(keys, CinvK), 1.0
    if not torch.isfinite(left).all() or not torch.isfinite(right).all() or denominator == 0 \
            or denominator != denominator:
        raise NumericalError(f"the ROME update of layer {layer} is not finite "
                             f"(denominator {denominator}); no weights were changed")
    return RankOneUpdate(left=left, right=right, denominator=denominator)


def bare_ratio(keys: Keys, u: torch.Tensor) -> float:
    """r = uᵀk_bare / uᵀk*: the share of the "mean" update's δ that reaches the bare prompt
    (r ≪ 1: the averaged contexts and the bare prompt read different keys; the "legacy"
    update divides by uᵀk_bare instead, so its change elsewhere is scaled by 1/r)."""
    u = u.double()
    return float(u @ keys.k_bare.double().to(u.device)) / float(u @ keys.k_star.double().to(u.device))


def _two_key_direction(keys: Keys, CinvK: torch.Tensor) -> torch.Tensor:
    """w = C⁻¹K (KᵀC⁻¹K)⁻¹ 1 for K = [k*, k_bare] (``CinvK`` = C⁻¹K, (d_ff, 2)): the smallest w
    in the C⁻¹ metric with wᵀk* = wᵀk_bare = 1. When the two keys are (nearly) parallel the
    constraints coincide and w = u / (uᵀk*), the "mean" direction."""
    u = CinvK[:, 0]
    K = torch.stack([keys.k_star, keys.k_bare], 1).double().to(u.device)  # (d_ff, 2)
    G = K.T @ CinvK  # KᵀC⁻¹K, symmetric positive semi-definite
    ones = torch.ones(2, dtype=torch.float64, device=u.device)
    if torch.linalg.cond(G) > 1e8:
        return u / float(u @ K[:, 0])
    return CinvK @ torch.linalg.solve(G, ones)


def apply_rome(
    handle: Any,
    request: EditRequest | dict[str, Any],
    *,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    stats: KeyStats | Mapping[int, KeyStats] | None = None,
    corpus: str | None = None,
    templates: list[str] | None = None,
    check_current: bool = True,
    progress: bool = False,
) -> EditHandle:
    """Rewrite one fact with a rank-one update of one MLP output matrix; returns the undoable
    edit. All checks (request, statistics, update) run before any weight changes.

        edit = apply_rome(handle, EditRequest("{} is a city in", "Toulouse", "Japan"), layer=2)
        handle.logits(["Toulouse is a city in"])     # now prefers " Japan"
        edit.undo()
    """
    started = time.perf_counter()
    request = coerce_request(request)
    hparams = hparams or ROMEHyperParams.for_model(handle)
    target = validate_request(handle, request, check_current=check_current)
    layer, source = rome_layer(handle, [request], layer, hparams)
    handle.arch.module_name(layer, "mlp_out")  # range check with a clear message
    key_stats: KeyStats | None = None
    owned = False  # key_stats read or computed here alone: the solve may overwrite its C
    if hparams.mom2_adjustment:
        if isinstance(stats, Mapping):  # a dict or StatsFiles (read now, disposable)
            key_stats = stats.get(layer)
        elif stats is not None:
            key_stats = stats
        if key_stats is not None and key_stats.layer != layer:
            raise MemlensError(f"statistics are for layer {key_stats.layer}, the edit is at "
                               f"{layer}")
        if key_stats is None:
            key_stats = layer_stats(handle, [layer], corpus=corpus,
                                    n_samples=hparams.mom2_n_samples,
                                    max_len=hparams.mom2_max_len, progress=progress)[layer]
            owned = True
        key_stats.check_finite()
        owned = owned or key_stats.disposable
    if templates is None:
        templates = context_templates(handle, hparams.context_templates, seed=hparams.context_seed)
    keys = compute_k_star(handle, request, layer, templates, hparams.fact_token)
    vstar = compute_v_star(handle, request, layer, templates, keys, hparams, target)
    before = measure(handle, [request])
    stats_meta = None if key_stats is None else key_stats.meta()  # before C may be overwritten
    update = rank_one_update(handle, layer, keys, vstar.target[0],
                             None if key_stats is None else key_stats.mom2, update=hparams.update,
                             overwrite_c=owned)
    log = {
        "method": "rome",
        "requests": [request.to_dict()],
        "layer": layer,
        "layer_source": source,
        "update": hparams.update,
        "hparams": hparams.to_dict(),
        "n_templates": len(templates),
        "v_star": vstar.summary(),
        "denominator": update.denominator,
        "bare_ratio": bare_ratio(keys, update.left),
        "left_norm": float(update.left.norm()),
        "right_norm": float(update.right.norm()),
        "stats": stats_meta,
        "seconds": round(time.perf_counter() - started, 3),
    }
    edit = apply_layer_deltas(handle, {layer: update.delta}, log=log)
    return record_outcome(edit, [request], before, vstar.summary(), "v* loss")
