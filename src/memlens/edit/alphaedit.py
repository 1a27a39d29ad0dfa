"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

    state = AlphaEditState()                        # the keys of earlier edits (K_p)
    edit = apply_alphaedit(handle, requests[:100], layers=[1, 2], state=state)
    edit = apply_alphaedit(handle, requests[100:200], layers=[1, 2], state=state)  # sequential
    edit.log["nullspace"]                           # {layer: {"dim": 412, "d_ff": 1024, ...}}
    edit.undo()                                     # bit-exact; its keys leave the state too

MEMIT (:mod:`memlens.edit.memit`) with another layer update. z, the keys K₁ and the residuals
R_l are MEMIT's (same hyper-parameters, same same-subject merge); only the solve differs:

1. **P, the null-space projection.** C_l = E[k kᵀ] (:mod:`memlens.stats`, the uncentered
   second moment of layer l's keys over the corpus = K₀K₀ᵀ/N, K₀ the keys to preserve).
   C_l = U Λ Uᵀ (eigh, float64); Û = the eigenvectors with λ_i < ``nullspace_threshold``;
   P_l = Û Ûᵀ. Then P K₀ ≈ 0: an update of the form X P leaves every preserved key's output
   (nearly) unchanged. The threshold is absolute on the raw moment, as in the reference code
   (its gpt2-xl / gpt-j / Llama3-8B files use 2e-2; the brief of issue 18 quoted 1e-2).
2. **The update.** Δ_l = R_l K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹    (paper eq. 16; α = ``l2``)
   with K₁ the keys of this batch and K_p the keys of earlier AlphaEdit edits of the same
   model still applied. Solved in float64 as (P(K₁K₁ᵀ + K_pK_pᵀ) + α I) X = P K₁ R_lᵀ,
   Δ_l = Xᵀ. X lies in range(P) (α X = P(K₁R_lᵀ − (K₁K₁ᵀ + K_pK_pᵀ) X)), so Δ_l K₀ ≈ 0 with
   no further projection. MEMIT's λ C_l term is gone: the projection replaces it, so
   ``mom2_update_weight`` is unused.

**Where K_p lives: an explicit** :class:`AlphaEditState` **passed by the caller.** It holds,
per edit, that edit's Σ K₁K₁ᵀ per layer, and counts only edits that are not undone — so
undoing an edit also removes its keys, and a state can be shared by edits applied and undone
in any order the ledger allows. Without ``state`` each call starts from K_p = 0 (one batch, or
``hparams.batch_size`` batches that accumulate among themselves). The editor registry keeps
one state per prepared plan (:class:`memlens.edit.editors.Plan`), so sequential rounds of
``memlens bench-edits --sequential`` accumulate. The state also caches P per layer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from memlens.edit.hparams import InvalidHyperParams
from memlens.edit.memit import MEMITHyperParams, plan_memit, write_planned
from memlens.edit.requests import EditRequest
from memlens.errors import MemlensError, NumericalError
from memlens.ledger import EditHandle
from memlens.stats import KeyStats


@dataclass(frozen=True)
class AlphaEditHyperParams(MEMITHyperParams):
    """MEMIT's settings (z, keys, layers, statistics) plus the two of AlphaEdit's solve;
    defaults = the reference's hparams/AlphaEdit/gpt2-xl.json."""

    # eigenvalues of C = E[kkᵀ] below this span the null space (absolute, on the raw moment)
    nullspace_threshold: float = 2e-2
    l2: float = 10.0  # α: the ridge α I of the solve (the reference's "L2")

    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        k: {} for k in MEMITHyperParams.FAMILY_DEFAULTS}
    #: MEMIT's organism settings (bare + mean keys, longer z optimisation); λ is unused.
    ORGANISM_DEFAULTS: ClassVar[dict[str, Any]] = {
        k: v for k, v in MEMITHyperParams.ORGANISM_DEFAULTS.items()
        if k != "mom2_update_weight"}

    def check(self) -> None:
        super().check()
        if not self.mom2_adjustment:
            raise InvalidHyperParams("AlphaEdit needs the key statistics (mom2_adjustment) "
                                     "for its null-space projection")
        if self.nullspace_threshold <= 0 or self.l2 <= 0:
            raise InvalidHyperParams(f"nullspace_threshold and l2 must be > 0, got "
                                     f"{self.nullspace_threshold} and {self.l2}")


def nullspace_projection(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = Û Ûᵀ (float64, (d, d)) with Û the eigenvectors of the symmetric ``mom2`` whose
    eigenvalues are below ``threshold``; and dim Û (0: P = 0, nothing can be written)."""
    eigenvalues, U = torch.linalg.eigh(mom2.double())
    U_hat = U[:, eigenvalues < threshold]  # (d, null dim)
    return U_hat @ U_hat.T, int(U_hat.shape[1])


@dataclass
class AlphaEditState:
    """The keys of earlier AlphaEdit edits of one model, K_p K_pᵀ per layer, counted while
    their edit is applied (not undone); and the projections P, cached per layer."""

    entries: list[tuple[EditHandle, dict[int, torch.Tensor]]] = field(default_factory=list)
    projections: dict[tuple[Any, ...], tuple[torch.Tensor, int]] = field(default_factory=dict)

    def live(self, handle: Any) -> list[dict[int, torch.Tensor]]:
        """Σ K₁K₁ᵀ per layer of each edit of ``handle`` still applied."""
        if any(e.handle is not handle for e, _ in self.entries):
            raise MemlensError("this AlphaEditState holds edits of another model")
        self.entries = [(e, kkt) for e, kkt in self.entries if not e.undone]  # undo is final
        return [kkt for _, kkt in self.entries]

    def preserved(self, handle: Any, layer: int, d_ff: int) -> torch.Tensor:
        """K_p K_pᵀ of ``layer`` (float64, (d_ff, d_ff); zeros before any edit)."""
        total = torch.zeros(d_ff, d_ff, dtype=torch.float64)
        for kkt in self.live(handle):
            if layer in kkt:
                total += kkt[layer]
        return total

    def n_edits(self, handle: Any) -> int:
        return len(self.live(handle))

    def projection(self, stats: KeyStats, threshold: float) -> tuple[torch.Tensor, int]:
        """P of ``stats``' layer at ``threshold``, computed once."""
        key = (stats.layer, threshold, stats.fingerprint, stats.corpus, stats.count)
        if key not in self.projections:
            self.projections[key] = nullspace_projection(stats.mom2, threshold)
        return self.projections[key]


def alphaedit_layer_delta(K: torch.Tensor, resid: torch.Tensor, P: torch.Tensor,
                          KpKp: torch.Tensor, l2: float, layer: int) -> torch.Tensor:
    """Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹ in float64, from K₁ (d_ff, m),
    R (d_model, m), P and K_pK_pᵀ (d_ff, d_ff). Raises NumericalError if not finite."""
    K, resid = K.double(), resid.double()
    P, KpKp = P.to(K.device, torch.float64), KpKp.to(K.device, torch.float64)
    eye = torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
    A = P @ (K @ K.T + KpKp) + l2 * eye  # (d_ff, d_ff)
    try:
        X = torch.linalg.solve(A, P @ K @ resid.T)  # (d_ff, d_model), in range(P)
    except RuntimeError as exc:
        raise NumericalError(f"the AlphaEdit system of layer {layer} is singular ({exc}); "
                             "raise l2; no weights were changed") from None
    if not torch.isfinite(X).all():
        raise NumericalError(f"the AlphaEdit update of layer {layer} contains NaN/inf; "
                             "no weights were changed")
    return X.T


def apply_alphaedit(
    handle: Any,
    requests: Sequence[EditRequest | dict[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    hparams: AlphaEditHyperParams | None = None,
    stats: Mapping[int, KeyStats] | None = None,
    corpus: str | None = None,
    templates: list[str] | None = None,
    state: AlphaEditState | None = None,
    check_current: bool = True,
    skip_invalid: bool = False,
    progress: bool = True,
) -> EditHandle:
    """Write many facts into the MLP output matrices of ``layers`` with updates confined to
    the null space of the preserved keys; returns the undoable edit (as :func:`apply_memit`:
    everything checked before any weight changes, restored before raising).

        edit = apply_alphaedit(handle, [EditRequest("{} is a city in", "Toulouse", "Japan")],
                               layers=[1, 2], state=state)
        edit.log["nullspace"]["1"]["dim"]    # dimensions P keeps of layer 1's keys
        edit.undo()

    ``state`` carries the keys of earlier edits (:class:`AlphaEditState`); this edit's keys
    are added to it.
    """
    started = time.perf_counter()
    hp = hparams or AlphaEditHyperParams.for_model(handle)
    if not isinstance(hp, AlphaEditHyperParams):
        raise InvalidHyperParams(f"apply_alphaedit needs AlphaEditHyperParams, got "
                                 f"{type(hp).__name__}")
    state = AlphaEditState() if state is None else state
    plan = plan_memit(handle, requests, layers, hp, stats, corpus, templates, check_current,
                      skip_invalid, progress)
    projections = {layer: state.projection(plan.stats[layer], hp.nullspace_threshold)
                   for layer in plan.layers}
    empty = [layer for layer, (_, dim) in projections.items() if dim == 0]
    if empty:
        raise MemlensError(f"no eigenvalue of C is below nullspace_threshold "
                           f"{hp.nullspace_threshold:g} at layer(s) {empty}: P = 0 would write "
                           "nothing; raise nullspace_threshold")
    n_before = state.n_edits(handle)
    added: dict[int, torch.Tensor] = {}  # this call's Σ K₁K₁ᵀ, seen by its later batches

    def solve(layer: int, K: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        P = projections[layer][0]
        KpKp = state.preserved(handle, layer, K.shape[0])
        if layer in added:
            KpKp = KpKp + added[layer]
        delta = alphaedit_layer_delta(K, resid, P, KpKp, hp.l2, layer)
        kkt = K.double() @ K.double().T
        added[layer] = added[layer] + kkt if layer in added else kkt
        return delta

    edit = write_planned(handle, plan, method="alphaedit", solve=solve, started=started,
                         progress=progress)
    state.entries.append((edit, added))
    edit.log["nullspace"] = {str(layer): {"dim": dim, "d_ff": int(P.shape[0]),
                                          "threshold": hp.nullspace_threshold}
                             for layer, (P, dim) in projections.items()}
    edit.log["earlier_edits"] = n_before  # edits whose keys K_p held
    return edit


__all__ = ["AlphaEditHyperParams", "AlphaEditState", "alphaedit_layer_delta",
           "apply_alphaedit", "nullspace_projection"]
