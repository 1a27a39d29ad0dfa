"""Causal tracing (Meng et al. 2022, §2): where in the network a model recalls a fact.

    from memlens.trace import trace_fact, average_trace, best_layer
    result = trace_fact(handle, "Toulouse is a city in", "Toulouse")    # hidden, mlp, attn
    avg = average_trace(handle, facts)                                   # AIE per token group
    avg.recall_site()                                                    # summary for organisms

Modules: :mod:`~memlens.trace.noise` (the corruption), :mod:`~memlens.trace.sites` (what a
restoration restores, and the inputs of a trace), :mod:`~memlens.trace.runs` (the trace of one
fact, severed runs, the best layer), :mod:`~memlens.trace.fast` (the batched algorithm),
:mod:`~memlens.trace.average` (AIE/ATE over many facts), :mod:`~memlens.trace.plot`
(heatmaps and line plots), :mod:`~memlens.trace.reference` (the naive algorithm, for checks).
"""

from memlens.trace.average import (
    GROUPS,
    AverageTrace,
    average_trace,
    load_facts,
    select_facts,
    trace_cache,
)
from memlens.trace.noise import NoiseSpec, noise_scale
from memlens.trace.runs import TraceResult, best_layer, severed_trace, trace_fact
from memlens.trace.sites import ALL_KINDS, KINDS, SEVERED_KINDS

__all__ = [
    "ALL_KINDS", "GROUPS", "KINDS", "SEVERED_KINDS", "AverageTrace", "NoiseSpec",
    "TraceResult", "average_trace", "best_layer", "load_facts", "noise_scale", "select_facts",
    "severed_trace", "trace_cache", "trace_fact",
]
