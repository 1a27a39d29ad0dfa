"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023).

    edit = apply_memit(handle, load_requests("cf.json"), layers=[1, 2])
    edit.layers, edit.delta_norms, edit.log["z"]       # where, how much, the z optimisation
    edit.undo()                                          # bit-exact

Thousands of facts are written into the MLP output matrices W_l of a band of layers R:

1. z_i = h_i + δ_i at the TOP layer L = max(R), on the residual stream (block output) at each
   fact's token: δ_i minimises the target NLL over context-templated prompts + KL + decay, with
   ‖δ_i‖ ≤ 0.75 ‖h_i‖ — optimised for all facts in one batch (:mod:`memlens.edit.optimize`).
2. For each l ∈ R in increasing order, with the layers below already updated:
   K_l (d_ff × n) keys at the fact token, averaged over context templates (``keys="both"``
   adds the bare prompts' keys as n more columns with the same residuals);
   H (d_model × n) the current top-layer hidden states at the bare prompts;
   R_l = (Z − H) / (|R| − index of l)                      (spread the residual over the layers left)
   Δ_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹                      (float64; C_l = E[k kᵀ] from stats)
   W_l ← W_l + Δ_l.
λ (``mom2_update_weight``) multiplies the normalised moment C = (1/N) Σ k kᵀ as in the reference
code, so λ C = (λ/N) K₀K₀ᵀ: each inserted key weighs as much as N/λ corpus tokens, whatever N.
"""

from __future__ import annotations

import time
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memlens.edit.context import context_templates
from memlens.edit.hparams import FactToken, HyperParams, InvalidHyperParams, check_delta_settings
from memlens.edit.keys import fact_token_reads
from memlens.edit.layers import choose_layers, chosen_layers
from memlens.edit.optimize import DeltaObjective, optimize_deltas
from memlens.edit.outcome import measure, record_outcome
from memlens.edit.requests import EditRequest, InvalidRequest, coerce_request, validate_request
from memlens.errors import EmptyInput, MemlensError, NumericalError
from memlens.ledger import EditHandle, edit_weight_name
from memlens.stats import KeyStats, layer_stats, stats_meta

#: Which keys MEMIT writes each fact's residual through (``MEMITHyperParams.keys``).
MEMIT_KEYS = ("mean", "both")


@dataclass(frozen=True)
class MEMITHyperParams(HyperParams):
    """MEMIT settings; defaults = the reference's gpt2-xl.json / EleutherAI_gpt-j-6B.json."""

    layers: tuple[int, ...] | None = None  # R; None: from a causal trace, else a middle band
    fact_token: FactToken = "subject_last"  # where keys are read and z written
    v_lr: float = 0.5  # Adam learning rate of δ
    v_num_grad_steps: int = 20  # at most this many forward passes per fact
    v_stop_loss: float = 0.05  # a fact stops when its loss falls below this
    v_weight_decay: float = 0.5  # weight of ‖δ‖ / ‖h‖²
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor · ‖h‖
    kl_factor: float = 0.0625  # weight of KL(edited ‖ original) on kl_prompt
    kl_prompt: str = "{} is a"  # essence prompt whose distribution must not drift
    mom2_adjustment: bool = True  # False: λ C replaced by λ I (no covariance)
    mom2_update_weight: float = 15000.0  # λ
    mom2_n_samples: int = 1000  # corpus samples for C = E[k kᵀ]
    mom2_max_len: int = 256  # tokens per sample
    context_templates: tuple[tuple[int, int], ...] = ((10, 10),)  # (tokens, count)
    context_seed: int = 0  # seed of the template sampler
    # Keys each fact inserts (MEMIT_KEYS): "mean" k̄ over context templates (the paper),
    # "both" k̄ and the bare prompt's key k_bare as two columns with the same residual
    keys: str = "mean"
    # requests about one subject share one z, optimised for all their targets at once
    # (MEMIT-Merge, Dong et al. 2025): their keys are (nearly) the same, so separate z's
    # would ask one key for several values; False keeps the reference's one z per request
    merge_same_subject: bool = True
    batch_size: int | None = None  # edits per sequential MEMIT batch (None: all at once)
    # padded tokens per forward pass (z optimisation, keys); small passes stay in CPU caches
    # (4,096 ran 1.5× faster than 16,384 on 2 CPU cores), raise it on a GPU
    max_batch_tokens: int = 4096

    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2": {"mom2_update_weight": 20000.0}, "gpt_neo": {}, "gptj": {}, "gpt_neox": {},
        "llama": {}, "mistral": {}, "qwen2": {},
    }
    #: Tuned on the tiny organism: λ = 300 and a clamp of 4·‖h‖ make ≥ 18 of 20 edits
    #: (tests/test_memit.py). On facts-gpt2 (200 edits, layers 0–1) the bare keys, more z
    #: steps with ROME's organism decay and the same-subject merge raised ES from 0.175 (mean
    #: keys) to 0.505, 0.70, 0.78 and 0.80; λ 100 or 1,000 did worse; layer 0 alone (ROME's
    #: organism layer) gave 0.855 at 200 and Score 0.594 vs 0.524 at 1,000 (docs/memit.md).
    ORGANISM_DEFAULTS: ClassVar[dict[str, Any]] = {"layers": (0,),
                                                   "mom2_update_weight": 300.0,
                                                   "clamp_norm_factor": 4.0,
                                                   "keys": "both",
                                                   "v_weight_decay": 0.05,
                                                   "v_num_grad_steps": 60}

    def check(self) -> None:
        check_delta_settings(self)
        if self.mom2_update_weight < 0:
            raise InvalidHyperParams(f"mom2_update_weight must be ≥ 0, got "
                                     f"{self.mom2_update_weight}")
        if self.keys not in MEMIT_KEYS:
            raise InvalidHyperParams(f"keys must be one of {', '.join(MEMIT_KEYS)}, "
                                     f"got {self.keys!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidHyperParams(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.layers is not None and (len(self.layers) == 0 or
                                        list(self.layers) != sorted(set(self.layers))):
            raise InvalidHyperParams(f"layers must be increasing and distinct, got {self.layers}")


def memit_layers(handle: Any, requests: Sequence[EditRequest], layers: Sequence[int] | None,
                 hparams: MEMITHyperParams) -> tuple[list[int], str]:
    """The band R MEMIT edits, sorted, and how it was chosen
    (:func:`~memlens.edit.layers.chosen_layers`): ``layers``, else ``hparams.layers``, else an
    averaged causal trace of the first requests."""
    band, source = chosen_layers(None if layers is None else list(layers),
                                 list(hparams.layers) if hparams.layers else None,
                                 lambda: choose_layers(handle, requests))
    return sorted({int(layer) for layer in band}), source


def _stats_for(handle: Any, layers: list[int], stats: Mapping[int, KeyStats] | None,
               hp: MEMITHyperParams, corpus: str | None, progress: bool
               ) -> Mapping[int, KeyStats]:
    """C of every layer of the band: ``stats`` where given, the rest computed (or read from
    the cache). A large model's C's stay in the cache (:class:`~memlens.stats.StatsFiles`):
    each is read, and checked here once, when it is needed."""
    given = stats or {}
    missing = [layer for layer in layers if layer not in given]
    computed = layer_stats(handle, missing, corpus=corpus, n_samples=hp.mom2_n_samples,
                           max_len=hp.mom2_max_len, progress=progress) if missing else {}
    for layer in (layer for layer in layers if layer in given):
        if given[layer].layer != layer:
            raise MemlensError(f"statistics given for layer {layer} are of layer "
                               f"{given[layer].layer}")
        given[layer].check_finite()
    if not given or not computed:
        return given or computed
    return ChainMap(given, computed)  # type: ignore[arg-type]  # read-only: any Mapping serves


def memit_layer_delta(K: torch.Tensor, resid: torch.Tensor, C: torch.Tensor | None,
                      lam: float, layer: int, *, overwrite_c: bool = False) -> torch.Tensor:
    """Δ = R Kᵀ (λ C + K Kᵀ)⁻¹ in float64, from K (d_ff, n), R (d_model, n), C (d_ff, d_ff);
    C None means the identity. A = λC + KKᵀ is symmetric positive definite: it is factored
    by Cholesky in its own buffer, so the solve needs one d_ff² float64 buffer, and none
    beyond C with ``overwrite_c`` (a float64 C on K's device then becomes A: 328 MB saved at
    GPT-2 XL's d_ff). Raises NumericalError (nothing written) if A is not positive definite
    or Δ not finite."""
    K, resid = K.double(), resid.double()
    if C is None:
        A = K @ K.T
        A.diagonal().add_(lam)
    else:  # one (d_ff, d_ff) buffer: λC, then + KKᵀ in place
        C = C.to(K.device, torch.float64)
        A = C.mul_(lam) if overwrite_c else torch.mul(C, lam)
        A.addmm_(K, K.T)
    _, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32,
                                                               device=A.device)))
    if int(info) != 0:
        raise NumericalError(f"λC + KKᵀ of layer {layer} is not positive definite (its "
                             f"leading minor of order {int(info)} is not positive); collect key "
                             "statistics over more samples or raise mom2_update_weight; "
                             "no weights were changed")
    adj = torch.cholesky_solve(K, A)  # (λC + KKᵀ)⁻¹ K, (d_ff, n), from A's lower factor
    delta = resid @ adj.T  # (d_model, d_ff)
    if not torch.isfinite(delta).all():
        raise NumericalError(f"the MEMIT update of layer {layer} contains NaN/inf; "
                             "no weights were changed")
    return delta


@dataclass
class _Plan:
    """What one MEMIT run works with, fixed before any weight changes."""

    requests: list[EditRequest]
    targets: list[list[int]]
    layers: list[int]
    layer_source: str
    hparams: MEMITHyperParams
    stats: Mapping[int, KeyStats]
    templates: list[str]
    skipped: list[dict[str, Any]]


def apply_memit(
    handle: Any,
    requests: Sequence[EditRequest | dict[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    hparams: MEMITHyperParams | None = None,
    stats: Mapping[int, KeyStats] | None = None,
    corpus: str | None = None,
    templates: list[str] | None = None,
    check_current: bool = True,
    skip_invalid: bool = False,
    progress: bool = True,
) -> EditHandle:
    """Write many facts at once into the MLP output matrices of ``layers``; returns the
    undoable edit. Requests, statistics and z are checked before any weight changes; a
    NaN/inf update at a later layer restores the earlier layers before raising.

        edit = apply_memit(handle, [EditRequest("{} is a city in", "Toulouse", "Japan"),
                                    EditRequest("{} plays the", "Miles Davis", "violin")],
                           layers=[1, 2])
        edit.log["z"]["prob_after"]          # mean P(target) reached by z at the top layer
        edit.undo()

    ``skip_invalid`` drops requests that fail validation (logged in ``edit.log["skipped"]``)
    instead of raising; ``hparams.batch_size`` splits the requests into sequential batches.
    """
    started = time.perf_counter()
    plan = plan_memit(handle, requests, layers, hparams, stats, corpus, templates, check_current,
                      skip_invalid, progress)
    return write_planned(handle, plan, method="memit", solve=None, started=started,
                         progress=progress)


#: ``solve(layer, K, resid)`` → Δ_l (d_model, d_ff), from K (d_ff, m) and R_l (d_model, m):
#: the layer update of a MEMIT-family editor (None: MEMIT's own, :func:`memit_layer_delta`)
Solve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def write_planned(handle: Any, plan: _Plan, *, method: str, solve: Solve | None,
                  started: float, progress: bool) -> EditHandle:
    """Compute z and write the layer updates of a checked plan (:func:`plan_memit`), batch by
    batch; the sealed, outcome-checked edit (restored before raising on any failure). Shared
    by MEMIT and AlphaEdit (:mod:`memlens.edit.alphaedit`), which differ only in ``solve``."""
    hp = plan.hparams
    before = measure(handle, plan.requests)
    names = [edit_weight_name(handle, layer) for layer in plan.layers]
    edit = EditHandle.snapshot(handle, names, layers=list(plan.layers))
    batch = hp.batch_size or len(plan.requests)
    z_logs: list[dict[str, Any]] = []
    layer_logs: list[dict[str, Any]] = []
    try:
        for start in range(0, len(plan.requests), batch):
            z_log, logs = _memit_batch(handle, plan, range(start, start + batch), progress,
                                       solve)
            z_logs.append(z_log)
            layer_logs.extend(logs)
    except BaseException:
        edit.undo(force=True)
        raise
    arch = handle.arch
    for layer, name in zip(plan.layers, names, strict=True):
        W = arch.get_edit_weight(handle.model, layer).double()
        W0 = edit.originals[name].double()
        edit.delta_norms[layer] = float((W - (W0.T if arch.spec.mlp_out_transposed else W0))
                                        .norm())
    edit.log = {
        "method": method,
        "requests": [r.to_dict() for r in plan.requests],
        "n_requests": len(plan.requests),
        "skipped": plan.skipped,
        "layer_source": plan.layer_source,
        "hparams": hp.to_dict(),
        "n_templates": len(plan.templates),
        "z": _merge_z(z_logs),
        "layer_updates": layer_logs,
        "stats": stats_meta(plan.stats) if plan.stats else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    edit.seal()
    return record_outcome(edit, plan.requests, before, edit.log["z"], "z loss")


def plan_memit(handle: Any, requests: Sequence[EditRequest | dict[str, Any]],
               layers: Sequence[int] | None, hparams: MEMITHyperParams | None,
               stats: Mapping[int, KeyStats] | None, corpus: str | None,
               templates: list[str] | None, check_current: bool, skip_invalid: bool,
               progress: bool) -> _Plan:
    """Every check that can fail, before any weight is touched: requests, layers, key
    statistics (when ``hparams.mom2_adjustment``) and context templates."""
    hp = hparams or MEMITHyperParams.for_model(handle)
    reqs = [coerce_request(r) for r in requests]
    if not reqs:
        raise EmptyInput("no edit requests given")
    kept, targets, skipped = [], [], []
    for i, request in enumerate(reqs):
        try:
            targets.append(validate_request(handle, request, check_current=check_current))
            kept.append(request)
        except MemlensError as exc:
            if not (skip_invalid and isinstance(exc, InvalidRequest)):
                raise type(exc)(f"request {i}: {exc}") from None
            skipped.append({"index": i, "case_id": request.case_id, "reason": str(exc)})
    if not kept:
        raise InvalidRequest(f"all {len(reqs)} requests were invalid; first: "
                             f"{skipped[0]['reason']}")
    chosen, source = memit_layers(handle, kept, layers, hp)
    for layer in chosen:
        handle.arch.module_name(layer, "mlp_out")  # range check with a clear message
    key_stats = _stats_for(handle, chosen, stats, hp, corpus, progress) \
        if hp.mom2_adjustment else {}
    if templates is None:
        templates = context_templates(handle, hp.context_templates, seed=hp.context_seed)
    return _Plan(kept, targets, chosen, source, hp, key_stats, list(templates), skipped)


def _memit_batch(handle: Any, plan: _Plan, index: range, progress: bool,
                 solve: Solve | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compute z for the requests ``index`` and write Δ_l into every layer of R in order."""
    hp, arch, model = plan.hparams, handle.arch, handle.model
    requests = plan.requests[index.start: index.stop]
    targets = plan.targets[index.start: index.stop]
    top = plan.layers[-1]
    z_point = f"blocks.{top}.hook_resid_post"
    h0 = fact_token_reads(handle, requests, ["{}"], hp.fact_token, {z_point: "bare"},
                          max_batch_tokens=hp.max_batch_tokens)[z_point]
    groups = subject_groups(requests) if hp.merge_same_subject else \
        [[i] for i in range(len(requests))]
    z = optimize_deltas(handle, z_point, requests, targets, plan.templates,
                        h0[[g[0] for g in groups]], DeltaObjective.from_hparams(hp),
                        max_batch_tokens=hp.max_batch_tokens, progress=progress, groups=groups)
    group_of = torch.empty(len(requests), dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    Z = h0 + z.delta[group_of]  # z_i = h_i + δ of i's group, (n, d_model)
    logs = []
    for i, layer in enumerate(plan.layers):
        key_point = f"blocks.{layer}.mlp.hook_post"
        reads = fact_token_reads(handle, requests, plan.templates, hp.fact_token,
                                 {key_point: "mean", z_point: "bare"},
                                 max_batch_tokens=hp.max_batch_tokens)
        K = reads[key_point].T  # (d_ff, n)
        H = reads[z_point]  # (n, d_model)
        resid = (Z - H).T / (len(plan.layers) - i)  # R_l, (d_model, n)
        if hp.keys == "both":  # the bare prompts' keys as more columns, same residuals
            bare = fact_token_reads(handle, requests, ["{}"], hp.fact_token, {key_point: "bare"},
                                    max_batch_tokens=hp.max_batch_tokens)[key_point].T
            K, resid = torch.cat([K, bare], 1), torch.cat([resid, resid], 1)
        if solve is not None:
            delta = solve(layer, K, resid)
        elif hp.mom2_adjustment:
            stats = plan.stats[layer]  # read from the cache now, for a large model
            delta = memit_layer_delta(K, resid, stats.mom2, hp.mom2_update_weight, layer,
                                      overwrite_c=stats.disposable)
            del stats
        else:
            delta = memit_layer_delta(K, resid, None, hp.mom2_update_weight, layer)
        W = arch.get_edit_weight(model, layer)
        arch.set_edit_weight(model, layer, (W.double() + delta.to(W.device)).to(W.dtype))
        logs.append({"layer": layer, "residual_norm": float((Z - H).norm(dim=1).mean()),
                     "delta_norm": float(delta.norm()), "n": len(requests)})
    return z.summary(), logs


def subject_groups(requests: Sequence[EditRequest]) -> list[list[int]]:
    """Indices of the requests grouped by subject, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.subject, []).append(i)
    return list(groups.values())


def _merge_z(logs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the z summaries of sequential batches, weighted by their sizes."""
    if len(logs) == 1:
        return logs[0]
    total = sum(x["n"] for x in logs)
    return {"n": total, "batches": len(logs),
            **{k: sum(x[k] * x["n"] for x in logs) / total for k in logs[0] if k != "n"}}
