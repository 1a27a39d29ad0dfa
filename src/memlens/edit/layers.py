"""Which layers an editor edits, and how they were chosen: one rule, one labelling.

    layer, source = chosen_layers(None, hparams.layer, lambda: choose_layer(handle, request))
    source                    # "user", "hparams", or how the causal trace chose: "causal trace"
    band, how = choose_layers(handle, requests)           # MEMIT's band R from an averaged trace

Every editor picks its layer(s) the same way (:func:`chosen_layers`): those the caller gives
(``"user"``), else those its hyper-parameters name (``"hparams"``; memlens' organisms have
their own defaults), else a causal trace of the requests — one layer (ROME, FT:
:func:`choose_layer`) or a band (MEMIT: :func:`choose_layers`), with the middle layer or band
when the trace finds no effect (the label then says why). Editors log the label as
``layer_source``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from memlens.edit.requests import EditRequest
from memlens.errors import MemlensError

USER = "user"  # the caller gave the layer(s)
HPARAMS = "hparams"  # the editor's hyper-parameters name them

Layers = TypeVar("Layers", int, list[int])


def chosen_layers(given: Layers | None, from_hparams: Layers | None,
                  trace: Callable[[], tuple[Layers, str]]) -> tuple[Layers, str]:
    """The layer(s) to edit and how they were chosen: ``given`` ("user"), else
    ``from_hparams`` ("hparams"), else ``trace()`` (which says how it chose)."""
    if given is not None:
        return given, USER
    if from_hparams is not None:
        return from_hparams, HPARAMS
    return trace()


def choose_layer(handle: Any, request: EditRequest) -> tuple[int, str]:
    """The layer to edit and how it was chosen: the MLP layer with the largest indirect
    effect in a causal trace of the request among the layers that can reach the prediction
    (:func:`memlens.trace.best_layer`); the middle layer when the trace finds no effect (the
    reason is the returned source) or :mod:`memlens.trace` is not installed."""
    try:
        from memlens.trace.runs import NoCausalEffect, best_layer
    except ImportError:
        return handle.n_layers // 2, "middle layer (memlens.trace not available)"
    try:
        return int(best_layer(handle, request.text, request.subject, kind="mlp")), "causal trace"
    except NoCausalEffect as exc:
        return handle.n_layers // 2, f"middle layer, because {exc}"


def middle_band(n_layers: int) -> list[int]:
    """A band of early-middle layers: |R| = max(2, L/8) layers from L/4 (gpt2-xl: 12–17,
    the reference uses 13–17), ending before the last layer (see :func:`choose_layers`)."""
    size = max(1, min(n_layers - 1, max(2, n_layers // 8)))
    start = max(0, min(n_layers // 4, n_layers - 1 - size))
    return list(range(start, start + size))


def choose_layers(handle: Any, requests: Sequence[EditRequest], *, n_facts: int = 5,
                  threshold: float = 0.5) -> tuple[list[int], str]:
    """R and how it was chosen: the contiguous layers around the peak of the averaged MLP
    indirect effect at the last subject token whose effect is ≥ ``threshold`` × the peak
    (a causal trace of up to ``n_facts`` requests, window scaled to depth), else
    :func:`middle_band`. The top layer of R is at most L − 2: z is written at the subject and
    only later layers can carry it to the prediction."""
    band = middle_band(handle.n_layers)
    try:
        from memlens.trace import average_trace
        from memlens.trace.sites import depth_scaled_window
    except ImportError:
        return band, "middle band (memlens.trace not available)"
    facts = [{"prompt": r.text, "subject": r.subject,
              **({"attribute": r.target_true} if r.target_true else {})}
             for r in requests[:n_facts]]
    try:
        avg = average_trace(handle, facts, kinds=("mlp",), samples=3, progress=False,
                            window=depth_scaled_window(handle.n_layers))
    except MemlensError as exc:
        return band, f"middle band (trace failed: {exc})"
    if avg.n_facts == 0:
        return band, "middle band (no traced fact was known to the model)"
    curve = avg.effect("mlp", "last_subject")
    band = band_around_peak(curve, threshold)
    if band is None:
        return middle_band(handle.n_layers), \
            "middle band (no positive MLP effect at the last subject token)"
    peak = max(band, key=lambda layer: curve[layer])
    return band, f"causal trace of {avg.n_facts} facts (MLP AIE peak {peak})"


def band_around_peak(curve: Sequence[float], threshold: float = 0.5) -> list[int] | None:
    """The contiguous layers around the peak of ``curve`` (an MLP indirect effect per layer at
    the last subject token) whose effect is ≥ ``threshold`` × the peak, leaving out the last
    layer (z written there cannot reach the prediction); None without a positive peak."""
    values = [float(v) for v in curve][: max(1, len(curve) - 1)]
    clean = [v if v == v else float("-inf") for v in values]  # NaN never peaks
    peak = max(range(len(clean)), key=clean.__getitem__)
    if not clean[peak] > 0:
        return None
    lo = hi = peak
    while lo > 0 and clean[lo - 1] >= threshold * clean[peak]:
        lo -= 1
    while hi < len(clean) - 1 and clean[hi + 1] >= threshold * clean[peak]:
        hi += 1
    return list(range(lo, hi + 1))
