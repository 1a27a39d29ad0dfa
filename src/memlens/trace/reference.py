"""The naive causal-tracing algorithm of the reference code, kept to verify and time the fast one.

    inp = trace_inputs(handle, "Toulouse is a city in", "Toulouse")
    p = patched_probability(handle, inp, restore=[(0, ("hidden", 2))])
    slow = naive_trace(handle, "Toulouse is a city in", "Toulouse")   # == trace_fact(...)

As kmeng01/rome ``experiments/causal_trace.py`` (``trace_with_patch``) and its frozen-MLP
notebook (``trace_with_repatch``): one forward pass of the WHOLE model per (token, layer) with a
batch of 1 + S rows — row 0 clean, rows 1..S corrupted by the same noise draws as the fast
path — copying row 0's value of each restored site into rows 1..S; frozen sites get the values
of a first, unrestored pass. All logits are computed. Use :func:`memlens.trace.trace_fact`
for real work: it returns the same scores many times faster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from memlens import hooks
from memlens.trace.noise import NoiseArg
from memlens.trace.runs import TraceResult
from memlens.trace.sites import (
    KINDS,
    Site,
    TraceInputs,
    check_kinds,
    default_window,
    restoration,
    site_hook,
    trace_inputs,
)

if TYPE_CHECKING:
    from memlens.model import ModelHandle


def patched_probability(handle: ModelHandle, inp: TraceInputs,
                        restore: Sequence[tuple[int, Site]] = (),
                        freeze: Sequence[tuple[int, Site]] = ()) -> float:
    """Mean P(answer) over the S corrupted rows with the (token, site) pairs of ``restore``
    set to their clean values and those of ``freeze`` to their corrupted values."""
    model, S = handle.model, inp.samples
    ids = inp.input_ids.expand(1 + S, -1)
    start, end = inp.span.start, inp.span.end

    def corrupt(embedded: torch.Tensor) -> torch.Tensor:
        out = embedded.clone()
        out[1:, start:end] += inp.noise
        return out

    to_restore: dict[Site, list[int]] = defaultdict(list)
    for token, site in restore:
        to_restore[site].append(token)
    to_freeze: dict[Site, list[int]] = defaultdict(list)
    for token, site in freeze:
        to_freeze[site].append(token)
    first_pass: dict[str, torch.Tensor] = {}
    if to_freeze:
        with torch.no_grad(), hooks.hooked(model, {"hook_embed": corrupt}), \
                hooks.capture(model, [site_hook(s) for s in to_freeze]) as first_pass:
            model(input_ids=ids, use_cache=False)

    def patch(site: Site):
        def fn(tensor: torch.Tensor) -> torch.Tensor:
            out = tensor.clone()
            for token in to_restore.get(site, []):
                out[1:, token] = out[0, token]
            for token in to_freeze.get(site, []):
                out[1:, token] = first_pass[site_hook(site)][1:, token]
            return out

        return fn

    fns = {"hook_embed": corrupt}
    fns.update({site_hook(s): patch(s) for s in {*to_restore, *to_freeze}})
    with torch.no_grad(), hooks.hooked(model, fns):
        logits = model(input_ids=ids, use_cache=False).logits
    return float(torch.softmax(logits[1:, -1], dim=-1).mean(dim=0)[inp.answer_id])


def naive_trace(handle: ModelHandle, prompt: str, subject: str, *,
                kinds: Sequence[str] = KINDS, samples: int = 10, noise: NoiseArg = None,
                seed: int = 0, window: int | None = None, answer: str | None = None,
                positions: Sequence[int] | None = None) -> TraceResult:
    """:func:`memlens.trace.trace_fact` computed the slow way: one batch-(1+S) forward pass of
    the whole model per (kind, token, layer); tokens not in ``positions`` are NaN."""
    kinds = check_kinds(kinds)
    inp = trace_inputs(handle, prompt, subject, samples=samples, noise=noise, seed=seed,
                       answer=answer)
    T, L = inp.n_tokens, handle.n_layers
    window = default_window(L) if window is None else window
    scores = {kind: np.full((T, L), np.nan) for kind in kinds}
    for kind in kinds:
        for t in range(T) if positions is None else positions:
            for layer in range(L):
                rest = restoration(kind, layer, L, window)
                scores[kind][t, layer] = patched_probability(
                    handle, inp, restore=[(t, s) for s in rest.restore],
                    freeze=[(t, s) for s in rest.freeze])
    ids = inp.input_ids[0].tolist()
    return TraceResult(
        prompt=prompt, subject=subject, tokens=[handle.tokenizer.decode([i]) for i in ids],
        input_ids=ids, subject_range=(inp.span.start, inp.span.end),
        answer=handle.tokenizer.decode([inp.answer_id]), answer_id=inp.answer_id,
        p_clean=inp.p_clean, p_corrupted=patched_probability(handle, inp),
        noise=inp.noise_spec.scale, noise_dist=inp.noise_spec.dist, samples=inp.samples,
        seed=seed, window=window, scores=scores,
    )
