"""Causal tracing of one fact: clean, corrupted and restored runs (Meng et al. 2022, §2).

    result = trace_fact(handle, "Toulouse is a city in", "Toulouse")
    result.scores["mlp"]          # (tokens, layers): P(answer) with a window of MLPs restored
    result.p_clean, result.p_corrupted, result.answer

Three runs per fact. The *clean* run reads the prompt as is and fixes the answer (the clean
run's top token unless given). The *corrupted* run adds noise ν·ε (:mod:`memlens.trace.noise`)
to the subject tokens' embeddings, S samples. A *restored* run is a corrupted run in which the
clean value of one site at one token is written back:

| kind           | written back at token t for "layer" l                                  |
|----------------|------------------------------------------------------------------------|
| ``hidden``     | the output of block l (the residual stream h_t^(l))                    |
| ``mlp``        | MLP outputs of layers max(0, l − w/2) .. min(L, l + w/2) − 1 (w=window) |
| ``attn``       | attention outputs of the same window of layers                         |
| ``severed_mlp``  | h_t^(l), while every MLP output at t stays at its corrupted value    |
| ``severed_attn`` | h_t^(l), while every attention output at t stays corrupted           |

The score of a run is P(answer) at the last position, averaged over the S samples.

**Speed.** :mod:`memlens.trace.fast` computes all restorations of a token in batched forward
passes over the positions they can change; :mod:`memlens.trace.reference` is the naive loop,
kept as the tests' oracle. The results are equal (tests check 1e-5 on every architecture).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memlens.errors import MemlensError
from memlens.tokens import subject_span
from memlens.trace.fast import base_runs, restored_scores
from memlens.trace.noise import NoiseArg, NoiseSpec
from memlens.trace.sites import (
    KINDS,
    SEVERED_KINDS,
    Restoration,
    check_kinds,
    default_window,
    depth_scaled_window,
    restoration,
    trace_inputs,
)

if TYPE_CHECKING:
    from memlens.model import ModelHandle


# ── results ──────────────────────────────────────────────────────────────────


@dataclass
class FactRun:
    """What every per-fact experiment records first: the prompt as tokens, where the subject
    is, the answer token and its probability in the clean run."""

    prompt: str
    subject: str
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]  # [first, last + 1)
    answer: str
    answer_id: int
    p_clean: float  # P(answer), clean run


@dataclass
class TraceResult(FactRun):
    """A causal trace of one fact. ``scores[kind][t, l]`` = P(answer) after restoring (t, l).

    Unrestored entries (positions not traced) are NaN (``null`` in JSON).
    """

    p_corrupted: float  # P(answer), corrupted run, mean over samples
    noise: float  # ν
    noise_dist: str
    samples: int
    seed: int
    window: int
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # kind → (T, L)

    @property
    def total_effect(self) -> float:
        """TE = p_clean − p_corrupted."""
        return self.p_clean - self.p_corrupted

    def indirect_effect(self, kind: str) -> np.ndarray:
        """IE[t, l] = p_restored − p_corrupted for ``kind``."""
        return self.scores[kind] - self.p_corrupted

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``trace.json`` format, see docs/tracing.md)."""
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": self.tokens,
            "input_ids": self.input_ids, "subject_range": list(self.subject_range),
            "answer": self.answer, "answer_id": self.answer_id,
            "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
            "total_effect": self.total_effect,
            "noise": self.noise, "noise_dist": self.noise_dist, "samples": self.samples,
            "seed": self.seed, "window": self.window, "kinds": list(self.scores),
            "scores": {k: _nan_to_none(v) for k, v in self.scores.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceResult:
        """Inverse of :meth:`to_json`."""
        fields = {k: data[k] for k in (
            "prompt", "subject", "tokens", "input_ids", "answer", "answer_id", "p_clean",
            "p_corrupted", "noise", "noise_dist", "samples", "seed", "window")}
        scores = {k: np.array(v, dtype=float) for k, v in data["scores"].items()}
        return cls(**fields, subject_range=tuple(data["subject_range"]), scores=scores)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(x) else float(x) for x in row] for row in matrix]


def trace_fact(handle: ModelHandle, prompt: str, subject: str, *,
               kinds: Sequence[str] = KINDS, samples: int = 10,
               noise: NoiseArg | NoiseSpec = None, seed: int = 0, window: int | None = None,
               answer: str | None = None, positions: Sequence[int] | None = None,
               batch_size: int = 512) -> TraceResult:
    """Causal trace of one fact: P(answer) after restoring each (token, layer), per kind.

    ``kinds``: any of hidden, mlp, attn, severed_mlp, severed_attn ("all" = the first three).
    ``noise``: None (ν = 3σ of subject embeddings, see :func:`resolve_noise`), a float ν, or
    "uniform". ``window``: layers restored together for mlp/attn (default
    :func:`default_window`). ``answer``: the token scored (default: the clean run's top token).
    ``positions``: tokens to trace (default: all; others are NaN). ``batch_size``: rows per
    forward pass (restorations × samples).

        result = trace_fact(handle, "Toulouse is a city in", "Toulouse", kinds=("mlp",))
        result.scores["mlp"].shape      # (n_tokens, n_layers)
    """
    kinds = check_kinds(kinds)
    window = default_window(handle.n_layers) if window is None else window
    if window < 1:
        raise MemlensError(f"window must be ≥ 1, got {window}")
    inp = trace_inputs(handle, prompt, subject, samples=samples, noise=noise, seed=seed,
                       answer=answer)
    T, L = inp.n_tokens, handle.n_layers
    positions = list(range(T)) if positions is None else list(positions)
    for t in positions:
        if not 0 <= t < T:
            raise MemlensError(f"position {t} is outside the prompt {prompt!r} ({T} tokens)")
    plan = {(kind, layer): restoration(kind, layer, L, window)
            for kind in kinds for layer in range(L)}
    freeze_sites = {s for r in plan.values() for s in r.freeze}
    runs = base_runs(handle, inp, freeze_sites)
    scores = {kind: np.full((T, L), np.nan) for kind in kinds}
    per_chunk = max(1, batch_size // inp.samples)
    for t in positions:
        if t < inp.span.start:  # the noise cannot reach token t: restoring it changes nothing
            for kind in kinds:
                scores[kind][t, :] = runs.p_corrupted
            continue
        unique = list(dict.fromkeys(plan.values()))
        found: dict[Restoration, float] = {}
        for i in range(0, len(unique), per_chunk):
            chunk = unique[i:i + per_chunk]
            found.update(zip(chunk, restored_scores(handle, inp, runs, t, chunk), strict=True))
        for (kind, layer), rest in plan.items():
            scores[kind][t, layer] = found[rest]
    ids = inp.input_ids[0].tolist()
    return TraceResult(
        prompt=prompt, subject=subject,
        tokens=[handle.tokenizer.decode([i]) for i in ids], input_ids=ids,
        subject_range=(inp.span.start, inp.span.end),
        answer=handle.tokenizer.decode([inp.answer_id]), answer_id=inp.answer_id,
        p_clean=inp.p_clean, p_corrupted=runs.p_corrupted, noise=inp.noise_spec.scale,
        noise_dist=inp.noise_spec.dist, samples=inp.samples, seed=seed, window=window,
        scores=scores,
    )


def severed_trace(handle: ModelHandle, prompt: str, subject: str, **kwargs: Any) -> TraceResult:
    """Hidden-state trace plus the two severed traces (MLP / attention at the token frozen).

    Accepts :func:`trace_fact`'s keywords except ``kinds``.

        result = severed_trace(handle, "Toulouse is a city in", "Toulouse")
        gap = result.scores["hidden"] - result.scores["severed_mlp"]   # what the MLPs carry
    """
    if "kinds" in kwargs:
        raise MemlensError("severed_trace chooses its kinds itself (hidden, severed_mlp, "
                           "severed_attn); use trace_fact for other kinds")
    return trace_fact(handle, prompt, subject, kinds=("hidden",) + SEVERED_KINDS, **kwargs)


MIN_RELATIVE_EFFECT = 0.02  # best_layer: an indirect effect below 2% of p_clean is no effect


class NoCausalEffect(MemlensError):
    """A causal trace found no layer whose restoration brings the answer back."""


def best_layer(handle: ModelHandle, prompt: str, subject: str, kind: str = "mlp",
               **kwargs: Any) -> int:
    """The layer where restoring ``kind`` at the subject's LAST token has the largest
    indirect effect — the layer ROME edits when none is given. The MLP/attention window is
    :func:`depth_scaled_window` unless ``window`` is given.

    Only layers from which that token can still reach the prediction compete: when the
    subject ends before the prompt's last token, the last layer is left out (no later
    attention carries its output to the last position). Raises :class:`NoCausalEffect` when
    no competing layer's indirect effect (restored P(answer) − corrupted P(answer)) exceeds
    ``MIN_RELATIVE_EFFECT`` × p_clean — a subject the model does not know, or a random model.

        layer = best_layer(handle, "Toulouse is a city in", "Toulouse")
    """
    last = subject_span(handle.tokenizer, prompt, subject).last
    kwargs.setdefault("window", depth_scaled_window(handle.n_layers))
    result = trace_fact(handle, prompt, subject, kinds=(kind,), positions=[last], **kwargs)
    reachable = handle.n_layers - (1 if last < len(result.input_ids) - 1 else 0)
    effects = result.scores[kind][last][:reachable] - result.p_corrupted
    best = float(np.nanmax(effects)) if np.isfinite(effects).any() else float("nan")
    if not best > MIN_RELATIVE_EFFECT * result.p_clean:
        raise NoCausalEffect(
            f"the causal trace of {prompt!r} found no layer where restoring the {kind} at "
            f"{subject!r} brings back {result.answer!r}: best indirect effect {best:.2g} "
            f"(p_clean {result.p_clean:.3g}, p_corrupted {result.p_corrupted:.3g}; the model "
            "does not seem to know this subject)")
    return int(np.nanargmax(effects))
