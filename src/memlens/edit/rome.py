"""ROME: Rank-One Model Editing (Meng et al. 2022, §3).

    edit = apply_rome(handle, {"prompt": "{} is a city in", "subject": "Toulouse",
                               "target_new": "Japan"})
    edit.layer, edit.delta_norms, edit.log        # where, how much, everything else
    edit.undo()                                   # bit-exact

The update inserts the pair (k*, v*) into W of layer l*:

    W ← W + (v* − W k* − b) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)

so that afterwards W k* + b = v*. k* is the key averaged over context templates; C = E[k kᵀ]
comes from :mod:`memlens.stats`. ``legacy=True`` reproduces the reference code, which instead
inserts (k_bare, v*) — numerator v* − W k_bare − b and denominator (C⁻¹k*)ᵀ k_bare with the key
k_bare of the bare prompt — a known inconsistency kept only for comparisons.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from memlens.edit.compute import Keys, compute_k_star, mlp_output_of
from memlens.edit.context import context_templates
from memlens.edit.hparams import ROMEHyperParams
from memlens.edit.ledger import EditHandle, apply_layer_deltas
from memlens.edit.optimize import DeltaObjective, DeltaResult, optimize_deltas
from memlens.edit.requests import EditRequest, coerce_request, validate_request
from memlens.errors import NumericalError
from memlens.stats import KeyStats, layer_stats


def choose_layer(handle: Any, request: EditRequest) -> tuple[int, str]:
    """The layer to edit and how it was chosen: the MLP layer with the largest indirect
    effect in a causal trace of the request (when :mod:`memlens.trace` is installed), else the
    middle layer."""
    try:
        from memlens.trace import best_layer
    except ImportError:
        return handle.n_layers // 2, "middle layer (memlens.trace not available)"
    return int(best_layer(handle, request.text, request.subject, kind="mlp")), "causal trace"


def left_vector(C: torch.Tensor | None, k_star: torch.Tensor, layer: int) -> torch.Tensor:
    """u = C⁻¹ k* in float64 (Cholesky solve); k* itself when C is None."""
    k_star = k_star.double()
    if C is None:
        return k_star
    C = C.to(k_star.device, torch.float64)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise NumericalError(
            f"the key second moment C of layer {layer} is not positive definite (too few or "
            "too repetitive corpus samples for its d_ff); collect statistics over more "
            "samples, or set mom2_adjustment=False; no weights were changed")
    return torch.cholesky_solve(k_star[:, None], L).squeeze(1)


@dataclass
class RankOneUpdate:
    """ΔW = right ⊗ left / denominator, as (d_model, d_ff)."""

    left: torch.Tensor  # u = C⁻¹ k* (d_ff,), float64
    right: torch.Tensor  # v* − W k − b (d_model,), float64
    denominator: float  # uᵀ k* (uᵀ k_bare when legacy)

    @property
    def delta(self) -> torch.Tensor:
        return torch.outer(self.right, self.left) / self.denominator


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
                    C: torch.Tensor | None, *, legacy: bool = False) -> RankOneUpdate:
    """The ROME update of ``layer`` from k*, v* and C (None: identity, no covariance)."""
    k_star = keys.k_star.double()
    u = left_vector(C, keys.k_star, layer)  # C⁻¹ k*
    k_insert = keys.k_bare.double() if legacy else k_star
    v_current = mlp_output_of(handle, layer, k_insert.float()).double()  # W k + b
    right = v_star.double().to(v_current.device) - v_current
    denominator = float(u @ k_insert.to(u.device))
    if not torch.isfinite(u).all() or not torch.isfinite(right).all() or denominator == 0 \
            or denominator != denominator:
        raise NumericalError(f"the ROME update of layer {layer} is not finite "
                             f"(denominator {denominator}); no weights were changed")
    return RankOneUpdate(left=u, right=right, denominator=denominator)


def apply_rome(
    handle: Any,
    request: EditRequest | dict[str, Any],
    *,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    stats: KeyStats | dict[int, KeyStats] | None = None,
    legacy: bool = False,
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
    if layer is None:
        layer = hparams.layer
    source = "user" if layer is not None else ""
    if layer is None:
        layer, source = choose_layer(handle, request)
    handle.arch.module_name(layer, "mlp_out")  # range check with a clear message
    key_stats: KeyStats | None = None
    if hparams.mom2_adjustment:
        if isinstance(stats, dict):
            key_stats = stats.get(layer)
        elif stats is not None:
            key_stats = stats
        if key_stats is not None and key_stats.layer != layer:
            raise ValueError(f"statistics are for layer {key_stats.layer}, the edit is at {layer}")
        if key_stats is None:
            key_stats = layer_stats(handle, [layer], corpus=corpus,
                                    n_samples=hparams.mom2_n_samples,
                                    max_len=hparams.mom2_max_len, progress=progress)[layer]
        key_stats.check_finite()
    if templates is None:
        templates = context_templates(handle, hparams.context_templates, seed=hparams.context_seed)
    keys = compute_k_star(handle, request, layer, templates, hparams.fact_token)
    vstar = compute_v_star(handle, request, layer, templates, keys, hparams, target)
    update = rank_one_update(handle, layer, keys, vstar.target[0],
                             None if key_stats is None else key_stats.mom2, legacy=legacy)
    log = {
        "method": "rome" + (" (legacy denominator)" if legacy else ""),
        "requests": [request.to_dict()],
        "layer": layer,
        "layer_source": source,
        "legacy": legacy,
        "hparams": hparams.to_dict(),
        "n_templates": len(templates),
        "v_star": vstar.summary(),
        "denominator": update.denominator,
        "left_norm": float(update.left.norm()),
        "right_norm": float(update.right.norm()),
        "stats": None if key_stats is None else key_stats.meta(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return apply_layer_deltas(handle, {layer: update.delta}, log=log)
