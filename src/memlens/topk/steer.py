"""Steer generation with one neuron: add δ to unit K of layer L's MLP hidden state everywhere.

    texts = steer(handle, layer=2, unit=17, delta=8.0, prompts=["The city of"])
    result = steer_report(handle, 2, 17, concept_ids=[412, 977], deltas=[4.0, 8.0],
                          prompts=["The city of", "He was born in"])
    result.best_ratio            # concept-token frequency, steered / unsteered (add-one smoothed)
    picks = auto_neurons(neuron_report(handle, heldout), n=5)     # see its docstring

The neuron is unit K of ``blocks.L.mlp.hook_post`` (the hidden state that feeds the MLP output
matrix; in a TopK layer: after the TopK). δ is added at every position of the prompt and of
every generated token, so the model sees the neuron "on" throughout. Generation is greedy, one
prompt at a time (no padding), so δ = 0 reproduces unsteered generation exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from memlens import hooks
from memlens.errors import EmptyInput
from memlens.topk.neurons import NeuronReport
from memlens.topk_mlp import TopKError

#: Generic prompts for a steering demo when none are given.
DEFAULT_PROMPTS = ("The", "It is", "In the", "This is a", "One of the")


@dataclass
class Neuron:
    """A neuron picked for steering, named by the tokens that activate it most."""

    layer: int
    unit: int
    tokens: list[str]  # above-threshold tokens, strongest first (its "concept")
    token_ids: list[int]
    semantic_entropy: float | None
    token_entropy: float | None
    peak: float  # largest mean |activation| per occurrence
    self_logit_z: float | None  # how strongly its output vector promotes its own tokens
    delta_scale: float  # δ that adds a vector as long as the residual stream at its layer

    @property
    def name(self) -> str:
        return f"L{self.layer}:{self.unit} " + "|".join(repr(t) for t in self.tokens[:5])


@dataclass
class DeltaResult:
    """Generations at one δ and how often the concept's tokens occur in them."""

    delta: float
    concept_count: int  # generated tokens that are concept tokens
    n_tokens: int  # generated tokens in total (all prompts)
    frequency: float  # concept_count / n_tokens
    ratio: float  # (concept_count + 1) / (baseline count + 1), same n_tokens budget
    samples: list[str] = field(default_factory=list)  # one continuation per prompt


@dataclass
class SteerReport:
    """Steered vs unsteered generations of one neuron over several prompts and δ values."""

    layer: int
    unit: int
    concept_tokens: list[str]
    concept_ids: list[int]
    prompts: list[str]
    baseline: DeltaResult  # δ = 0
    results: list[DeltaResult]  # one per δ ≠ 0

    @property
    def best(self) -> DeltaResult:
        return max(self.results, key=lambda r: r.ratio)

    @property
    def best_ratio(self) -> float:
        return self.best.ratio if self.results else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "best_ratio": self.best_ratio}


def _check_neuron(handle, layer: int, unit: int) -> None:
    if not 0 <= layer < handle.n_layers:
        raise TopKError(f"layer {layer} does not exist: the model has layers 0 … "
                        f"{handle.n_layers - 1}")
    if not 0 <= unit < handle.d_ff:
        raise TopKError(f"unit {unit} does not exist: layer {layer}'s MLP hidden state has units "
                        f"0 … {handle.d_ff - 1}")


def parse_neuron(text: str) -> tuple[int, int]:
    """``"3:117"`` → (3, 117); errors say what was expected."""
    layer, sep, unit = text.partition(":")
    if not sep or not layer.strip().isdigit() or not unit.strip().isdigit():
        raise TopKError(f"neuron {text!r} must be LAYER:UNIT, e.g. 3:117")
    return int(layer), int(unit)


@torch.no_grad()
def steer(
    handle,
    layer: int,
    unit: int,
    delta: float,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded) with δ added to neuron (layer, unit).

        steer(handle, 2, 17, 8.0, ["The city of"])     # [[412, 977, ...]]
    """
    _check_neuron(handle, layer, unit)
    if not math.isfinite(delta):
        raise TopKError(f"delta must be a finite number, got {delta}")
    if not prompts:
        raise EmptyInput("steering needs at least one prompt")
    vector = torch.zeros(handle.d_ff)
    vector[unit] = delta  # δ · e_K
    pad = handle.tokenizer.pad_token_id
    outputs = []
    with hooks.add(handle.model, f"blocks.{layer}.mlp.hook_post", vector):
        for prompt in prompts:
            batch = handle.encode([prompt])
            generated = handle.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )
            outputs.append(generated[0, batch.input_ids.shape[1]:].tolist())
    return outputs


def _count(generations: list[list[int]], concept: set[int]) -> tuple[int, int]:
    hits = sum(token in concept for row in generations for token in row)
    return hits, sum(len(row) for row in generations)


def steer_report(
    handle,
    layer: int,
    unit: int,
    concept_ids: Sequence[int],
    deltas: Sequence[float],
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 20,
) -> SteerReport:
    """Frequency of the concept tokens in generations at each δ, against δ = 0.

        r = steer_report(handle, 2, 17, concept_ids=[412], deltas=[4.0, 8.0])
        r.baseline.frequency, [d.frequency for d in r.results], r.best_ratio
    """
    concept = {int(t) for t in concept_ids}
    if not concept:
        raise EmptyInput(f"neuron {layer}:{unit} has no concept tokens to count")

    def run(delta: float, base_count: int | None) -> DeltaResult:
        rows = steer(handle, layer, unit, delta, prompts, max_new_tokens)
        hits, total = _count(rows, concept)
        ratio = 1.0 if base_count is None else (hits + 1) / (base_count + 1)
        return DeltaResult(delta=delta, concept_count=hits, n_tokens=total,
                           frequency=hits / max(total, 1), ratio=ratio,
                           samples=[handle.tokenizer.decode(row) for row in rows])

    baseline = run(0.0, None)
    results = [run(float(d), baseline.concept_count) for d in deltas if d != 0]
    tokens = [handle.tokenizer.decode([t]) for t in concept_ids]
    return SteerReport(layer=layer, unit=unit, concept_tokens=tokens,
                       concept_ids=[int(t) for t in concept_ids], prompts=list(prompts),
                       baseline=baseline, results=results)


def auto_neurons(
    report: NeuronReport,
    n: int = 5,
    *,
    min_tokens: int = 5,
    entropy_quantile: float = 0.5,
    topk_only: bool = True,
) -> list[Neuron]:
    """Low-semantic-entropy neurons that write their own concept, best steering candidates first.

    Candidates: neurons of the TopK layers (all layers for a dense model or ``topk_only=False``)
    with at least ``min_tokens`` concept tokens and a semantic entropy in the lowest
    ``entropy_quantile`` of those. They are ranked by ``self_logit_z`` — how strongly the
    neuron's output vector w_k raises its concept tokens' direct logits U·w_k.

    Why the ranking: a neuron that only *detects* its tokens (fires on " France", " Japan", ...)
    writes "the current token is a country", and steering it makes the model continue as after
    a country (" is", "."), not name one. Only a neuron whose output direction raises its
    concept's logits can raise their frequency.

        for neuron in auto_neurons(report, n=3): print(neuron.name)
    """
    if not 0.0 < entropy_quantile <= 1.0:
        raise TopKError(f"entropy_quantile must lie in (0, 1], got {entropy_quantile}")
    layers = [e for e in report.layers if e.is_topk] if topk_only else []
    pool = []
    for entry in layers or report.layers:
        for unit, sem in enumerate(entry.semantic_entropy):
            if sem is not None and entry.self_logit_z[unit] is not None \
                    and len(entry.top_token_ids[unit]) >= min_tokens:
                pool.append((sem, entry, unit))
    if not pool:
        return []
    pool.sort(key=lambda c: c[0])
    low = pool[: max(1, math.ceil(len(pool) * entropy_quantile))]
    low.sort(key=lambda c: -c[1].self_logit_z[c[2]])
    return [Neuron(layer=entry.layer, unit=unit, tokens=entry.top_tokens[unit],
                   token_ids=entry.top_token_ids[unit], semantic_entropy=sem,
                   token_entropy=entry.token_entropy[unit], peak=entry.peak[unit],
                   self_logit_z=entry.self_logit_z[unit], delta_scale=entry.delta_scale[unit])
            for sem, entry, unit in low[:n]]
