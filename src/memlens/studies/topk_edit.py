"""ROME on a TopK model: how many neurons the edited key activates, and what the edit writes to.

    report = rome_key_report(handle, [case.request for case in cases], corpus="corpus.txt")
    report.summary()["key_nonzero_mean"]      # == k in a TopK layer (d_ff-ish in a dense one)
    report.cases[0].top_concepts              # top tokens of the units ΔW changes most
    compare_rome_keys("runs/topk/topk", "runs/topk/dense", "organism:facts-gpt2", n=20)

ROME's key k is the MLP hidden state (``blocks.l.mlp.hook_post``, the input of the edited
matrix) at the subject's last token; in a TopK layer exactly k of its d_ff units are non-zero.
The rank-one update ΔW = (v* − W k* − b) uᵀ / (uᵀk*) with u = C⁻¹k* changes column j of W by
|u_j| × the same vector, so the units with the largest |u_j| are those whose output vectors the
edit changes most (no v* optimisation is needed to rank them). Their concepts are their top
tokens in :func:`~memlens.topk.neurons.neuron_report` on the organism's text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memlens.edit.compute import compute_k_star
from memlens.edit.context import context_templates
from memlens.edit.hparams import ROMEHyperParams
from memlens.edit.requests import EditRequest, coerce_request
from memlens.edit.rome import left_vector, rome_layer
from memlens.stats import layer_stats
from memlens.topk_mlp import topk_modules


@dataclass
class KeyCase:
    """The ROME key of one request and the units its update weighs most."""

    subject: str
    prompt: str
    key_nonzero: int  # non-zero units of k (bare prompt, fact token)
    key_units_90: int  # fewest units that hold 90% of ‖k‖²
    kstar_nonzero: int  # non-zero units of k* (mean over context templates)
    top_units: list[int]  # largest |u_j|, u = C⁻¹k*: the columns ΔW changes most
    top_share: list[float]  # u_j² / ‖u‖² of those units
    top_active: list[bool]  # whether each is non-zero in k
    top_concepts: list[list[str]]  # their top tokens (empty without a neuron report)
    u_mass_on_key: float  # share of ‖u‖² on the units where k ≠ 0


@dataclass
class KeyReport:
    """ROME keys of several requests in one model at one layer."""

    model: str
    layer: int
    d_ff: int
    topk_k: int | None  # k of the layer's TopK activation (None: dense layer)
    mom2: bool  # u = C⁻¹k* (True) or k* (no covariance)
    cases: list[KeyCase] = field(default_factory=list)

    def summary(self) -> dict:
        def mean(xs):
            xs = list(xs)
            return sum(xs) / len(xs) if xs else math.nan

        return {"model": self.model, "layer": self.layer, "d_ff": self.d_ff,
                "topk_k": self.topk_k, "n": len(self.cases),
                "key_nonzero_mean": mean(c.key_nonzero for c in self.cases),
                "key_units_90_mean": mean(c.key_units_90 for c in self.cases),
                "kstar_nonzero_mean": mean(c.kstar_nonzero for c in self.cases),
                "u_mass_on_key_mean": mean(c.u_mass_on_key for c in self.cases),
                "top_active_fraction": mean(a for c in self.cases for a in c.top_active)}

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def units_for_mass(k: torch.Tensor, share: float = 0.9) -> int:
    """Fewest units whose squared values hold ``share`` of ‖k‖² (0 for k = 0)."""
    energy = k.double().pow(2).sort(descending=True).values
    total = float(energy.sum())
    if total == 0.0:
        return 0
    return int((energy.cumsum(0) < share * total).sum()) + 1


def rome_key_report(handle: Any, requests: Sequence[EditRequest | dict], *,
                    layer: int | None = None, hparams: ROMEHyperParams | None = None,
                    corpus: str | None = None, neurons=None, n_top: int = 5,
                    n_concept_tokens: int = 5) -> KeyReport:
    """k, k* and u = C⁻¹k* of every request at ROME's layer (``layer``, else the hparams',
    else a causal trace of the first request), as ROME computes them (same fact token, context
    templates and key statistics). ``neurons``: a NeuronReport of ``handle`` that names the
    top units' concepts.

        rome_key_report(handle, requests, hparams=hp, corpus="corpus.txt").summary()
    """
    requests = [coerce_request(r) for r in requests]
    hp = hparams or ROMEHyperParams.for_model(handle)
    layer, _ = rome_layer(handle, requests, layer, hp)
    C = None
    if hp.mom2_adjustment:
        C = layer_stats(handle, [layer], corpus=corpus, n_samples=hp.mom2_n_samples,
                        max_len=hp.mom2_max_len, progress=False)[layer].mom2
    templates = context_templates(handle, hp.context_templates, seed=hp.context_seed)
    module = topk_modules(handle.model).get(layer)
    entry = None
    if neurons is not None:
        entry = next((e for e in neurons.layers if e.layer == layer), None)
    d_ff = handle.arch.get_edit_weight(handle.model, layer).shape[1]
    report = KeyReport(model=str(handle.ref), layer=layer, d_ff=int(d_ff),
                       topk_k=None if module is None else int(module.k), mom2=C is not None)
    for request in requests:
        keys = compute_k_star(handle, request, layer, templates, hp.fact_token)
        k = keys.k_bare.cpu()
        u = left_vector(C, keys.k_star, layer).cpu()  # (d_ff,), float64
        energy = u.pow(2)
        top = energy.topk(min(n_top, len(u))).indices.tolist()
        active = k != 0
        report.cases.append(KeyCase(
            subject=request.subject, prompt=request.prompt,
            key_nonzero=int(active.sum()), key_units_90=units_for_mass(k),
            kstar_nonzero=int((keys.k_star != 0).sum()), top_units=top,
            top_share=[float(energy[j] / energy.sum()) for j in top],
            top_active=[bool(active[j]) for j in top],
            top_concepts=[entry.top_tokens[j][:n_concept_tokens] if entry else [] for j in top],
            u_mass_on_key=float(energy[active].sum() / energy.sum())))
    return report


def compare_rome_keys(topk: str, dense: str, organism: str = "organism:facts-gpt2", *,
                      n: int = 20, layer: int | None = None, out: str | Path | None = None,
                      max_blocks: int = 256, n_top: int = 5, efficacy: bool = False) -> dict:
    """:func:`rome_key_report` of a TopK model and its dense twin on the first ``n`` CounterFact
    cases of ``organism`` (its counterfact.json, corpus and — for an organism — ROME settings);
    with ``out``, writes ``rome_keys.json`` and ``rome_keys.md``. Returns both reports' dicts.
    With ``efficacy``, each model's ``"counterfact"`` entry holds ES/PS/NS/Score before and
    after ROME edits those cases one at a time (:func:`~memlens.evaluate.counterfact.
    evaluate_counterfact`, no generation), the same edits on both models.

        compare_rome_keys(str(pair / "topk"), str(pair / "dense"), n=30, out="runs/keys")
    """
    from memlens.evaluate.counterfact import load_counterfact
    from memlens.model import load_model, resolve_organism
    from memlens.topk.data import neuron_blocks, read_corpus_text
    from memlens.topk.neurons import neuron_report

    source = resolve_organism(organism)
    cases = load_counterfact(str(source / "counterfact.json"), n=n)
    corpus = str(source / "corpus.txt")
    text = read_corpus_text(corpus)
    organism_defaults = (source / "organism.json").is_file()
    results: dict[str, Any] = {"organism": organism, "n": len(cases)}
    for name, ref in (("topk", topk), ("dense", dense)):
        handle = load_model(ref, device="cpu")
        hp = ROMEHyperParams.for_model(
            handle, **(ROMEHyperParams.ORGANISM_DEFAULTS if organism_defaults else {}))
        chosen, _ = rome_layer(handle, [cases[0].request], layer, hp)
        blocks = neuron_blocks(handle.tokenizer, text, min(128, handle.max_length or 128),
                               max_blocks)
        neurons = neuron_report(handle, blocks, layers=[chosen])
        report = rome_key_report(handle, [c.request for c in cases], layer=chosen, hparams=hp,
                                 corpus=corpus, neurons=neurons, n_top=n_top)
        results[name] = report.to_dict()
        if efficacy:
            from memlens.evaluate.counterfact import evaluate_counterfact

            summary = evaluate_counterfact(handle, cases, editor="rome", layer=chosen, hparams=hp,
                                           corpus=corpus, generation=None, progress=False).summary
            results[name]["counterfact"] = {k: summary[k] for k in EFFICACY_METRICS}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rome_keys.json").write_text(json.dumps(results, indent=1))
        (out / "rome_keys.md").write_text(keys_markdown(results))
    return results


#: What ``compare_rome_keys(efficacy=True)`` keeps of the CounterFact summary.
EFFICACY_METRICS = ("n", "ES", "PS", "NS", "Score")


def efficacy_rows(results: dict) -> list[list]:
    """One row per model of a ``compare_rome_keys(efficacy=True)`` result: name, then each of
    :data:`EFFICACY_METRICS` as 'pre → post'."""
    def cell(value) -> str:  # a metric no case gives is {"value": None, "reason": ...}
        return f"{value:.3f}" if isinstance(value, int | float) else "—"

    rows = []
    for name in ("topk", "dense"):
        summary = results[name]["counterfact"]
        rows.append([name, *(f"{cell(summary[k]['pre'])} → {cell(summary[k]['post'])}"
                             if k != "n" else f"{summary[k]['post']:.0f}"
                             for k in EFFICACY_METRICS)])
    return rows


def keys_markdown(results: dict) -> str:
    """The comparison as markdown: one summary row per model, then each TopK case's top units."""
    lines = ["| model | layer | d_ff | TopK k | non-zeros of k | units for 90% of ‖k‖² | "
             "non-zeros of k* | ‖u‖² on k's units | top-|u| units active in k |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ("topk", "dense"):
        s = results[name]["summary"]
        lines.append(f"| {name} | {s['layer']} | {s['d_ff']} | {s['topk_k'] or '—'} | "
                     f"{s['key_nonzero_mean']:.1f} | {s['key_units_90_mean']:.1f} | "
                     f"{s['kstar_nonzero_mean']:.1f} | {s['u_mass_on_key_mean']:.3f} | "
                     f"{s['top_active_fraction']:.3f} |")
    if "counterfact" in results["topk"]:
        lines += ["", "ROME on the same cases, each edited alone (pre → post):", "",
                  "| model | " + " | ".join(EFFICACY_METRICS) + " |",
                  "|---" * (len(EFFICACY_METRICS) + 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in efficacy_rows(results)]
    lines += ["", "Units with the largest |u_j| (ΔW column norm) in the TopK model:", "",
              "| subject | unit (share of ‖u‖², active) | concept |", "|---|---|---|"]
    for case in results["topk"]["cases"]:
        for j, unit in enumerate(case["top_units"][:3]):
            concept = ", ".join(repr(t) for t in case["top_concepts"][j]).replace("|", "\\|")
            lines.append(f"| {case['subject'] if j == 0 else ''} | {unit} "
                         f"({case['top_share'][j]:.2f}, {'yes' if case['top_active'][j] else 'no'})"
                         f" | {concept} |")
    return "\n".join(lines) + "\n"
