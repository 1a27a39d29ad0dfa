"""The whole TopK study in one call: train both models, compare neurons, steer one.

    summary = run_all("organism:facts-gpt2", "runs/topk", TopKTrainConfig(steps=300))
    summary["checks"]      # {'ppl_within_15pct': True, 'topk_entropy_lower': True, ...}

Writes into ``out``: ``dense/`` and ``topk/`` (saved HF models), ``neurons_dense.json``,
``neurons_topk.json``, ``entropy_by_layer.png``, ``steer.json`` (every auto-picked neuron),
``summary.json`` and ``summary.md`` (numbers and steered samples for a README).
Finished models are reused, so rerunning after an interrupt continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from memlens.cache import cache_dir
from memlens.topk.data import organism_corpus, text_blocks
from memlens.topk.neurons import NeuronReport, neuron_report, plot_entropy_by_layer
from memlens.topk.steer import Neuron, SteerReport, auto_neurons, steer_report
from memlens.topk.train import TopKTrainConfig, train_pair


def corpus_prompts(tokenizer, text: str, n: int = 6, n_tokens: int = 3) -> list[str]:
    """The first ``n_tokens`` tokens of the first ``n`` distinct lines of ``text`` (prompts)."""
    seen: list[str] = []
    for line in text.splitlines():
        ids = tokenizer(line.strip())["input_ids"][:n_tokens]
        prompt = tokenizer.decode(ids).strip()
        if len(ids) == n_tokens and prompt and prompt not in seen:
            seen.append(prompt)
        if len(seen) == n:
            break
    return seen


def run_all(
    organism: str = "organism:facts-gpt2",
    out: str | Path = "topk-run",
    cfg: TopKTrainConfig | None = None,
    *,
    n_auto: int = 8,
    multiples: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    n_neuron_blocks: int = 512,
    max_new_tokens: int = 20,
    models: str | Path | None = None,
) -> dict:
    """Train a TopK model and its dense twin on ``organism``'s corpus, measure neuron entropies
    of both, steer the ``n_auto`` neurons :func:`~memlens.topk.steer.auto_neurons` picks (δ =
    multiples × the neuron's ``delta_scale``: a vector as long as the residual stream at 1×)
    and write results and figures into ``out``. Returns the summary. The two models are
    trained into ``models/dense`` and ``models/topk`` (default ``models = out``); pass
    :func:`shared_models_dir` to reuse them across runs with the same organism and settings.

        run_all("organism:facts-llama", "runs/topk-llama", TopKTrainConfig(steps=200))
    """
    from memlens.model import load_model

    cfg = cfg or TopKTrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = organism_corpus(organism)
    block_size = min(128, _context(corpus.config))
    train, heldout = text_blocks(corpus.tokenizer, corpus.text, block_size)
    models = Path(models) if models is not None else out
    pair = train_pair(corpus.config, corpus.tokenizer, train, heldout, cfg, models)

    handles = {name: load_model(str(models / name), device="cpu") for name in ("dense", "topk")}
    neuron_blocks = torch.cat([heldout, train[: max(0, n_neuron_blocks - len(heldout))]])
    reports: dict[str, NeuronReport] = {}
    for name, handle in handles.items():
        reports[name] = neuron_report(handle, neuron_blocks)
        (out / f"neurons_{name}.json").write_text(json.dumps(reports[name].to_dict()))
    figure = plot_entropy_by_layer({"TopK": reports["topk"], "dense": reports["dense"]},
                                   out / "entropy_by_layer.png")

    tail = corpus.text.splitlines()[-max(1, len(corpus.text.splitlines()) // 10):]
    prompts = corpus_prompts(corpus.tokenizer, "\n".join(tail))  # from the held-out part
    steered: list[tuple[Neuron, SteerReport]] = []
    for neuron in auto_neurons(reports["topk"], n=n_auto):
        deltas = [m * neuron.delta_scale for m in multiples]
        steered.append((neuron, steer_report(handles["topk"], neuron.layer, neuron.unit,
                                             neuron.token_ids, deltas, prompts, max_new_tokens)))
    (out / "steer.json").write_text(json.dumps(
        [{"neuron": asdict(n), **r.to_dict()} for n, r in steered], indent=1))

    summary = _summary(pair.to_dict(), reports, [r for _, r in steered], figure, organism)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def shared_models_dir(organism: str, cfg: TopKTrainConfig) -> Path:
    """``$MEMLENS_HOME/topk/<organism build>-<hash>``: where a TopK/dense pair trained on
    ``organism`` with ``cfg`` is kept for reuse (the hash covers the organism's build id —
    its cache key, and for a shipped copy its weights — and every training setting)."""
    import hashlib

    from memlens.organisms.registry import build_id, resolve

    build = build_id(resolve(organism))
    blob = json.dumps({"organism": build, "config": asdict(cfg)}, sort_keys=True)
    return cache_dir("topk") / f"{build}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _context(config) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 128


def _summary(pair: dict, reports: dict[str, NeuronReport], steered: list[SteerReport],
             figure: Path, organism: str) -> dict:
    topk_layers = [e.layer for e in reports["topk"].layers if e.is_topk]
    entropy = {name: {e.layer: e.mean_token_entropy for e in report.layers}
               for name, report in reports.items()}
    semantic = {name: {e.layer: e.mean_semantic_entropy for e in report.layers}
                for name, report in reports.items()}
    best = max(steered, key=lambda r: r.best_ratio) if steered else None
    return {
        "organism": organism,
        "heldout_ppl": {"topk": pair["topk"]["heldout_ppl"], "dense": pair["dense"]["heldout_ppl"],
                        "ratio": pair["ppl_ratio"]},
        "tokens_per_second": {"topk": pair["topk"]["tokens_per_second"],
                              "dense": pair["dense"]["tokens_per_second"]},
        "sparsity_topk": pair["topk"]["sparsity"],
        "dead_fraction_topk": {s["layer"]: s["dead_fraction"] for s in pair["topk"]["sparsity"]},
        "topk_settings": pair["topk"]["topk"],
        "train_config": pair["config"],
        "mean_token_entropy": entropy,
        "mean_semantic_entropy": semantic,
        "steering": [{"neuron": f"{r.layer}:{r.unit}", "concept": r.concept_tokens,
                      "baseline_frequency": r.baseline.frequency,
                      "best_delta": r.best.delta if r.results else 0.0,
                      "best_frequency": r.best.frequency if r.results else r.baseline.frequency,
                      "best_ratio": r.best_ratio} for r in steered],
        "best_steering": None if best is None else {
            "neuron": f"{best.layer}:{best.unit}", "concept": best.concept_tokens,
            "ratio": best.best_ratio, "delta": best.best.delta,
            "baseline_samples": dict(zip(best.prompts, best.baseline.samples, strict=True)),
            "steered_samples": dict(zip(best.prompts, best.best.samples, strict=True)),
        },
        "checks": {
            "ppl_within_15pct": pair["ppl_ratio"] <= 1.15,
            "topk_entropy_lower": all(entropy["topk"][layer] < entropy["dense"][layer]
                                      for layer in topk_layers),
            "steering_several_fold": best is not None and best.best_ratio >= 3.0,
        },
        "figure": str(figure),
    }


def _markdown(summary: dict) -> str:
    ppl = summary["heldout_ppl"]
    lines = [
        f"# TopK vs dense twin on {summary['organism']}", "",
        f"- held-out perplexity: TopK {ppl['topk']:.2f}, dense {ppl['dense']:.2f} "
        f"(ratio {ppl['ratio']:.3f})",
        f"- training tokens/s: TopK {summary['tokens_per_second']['topk']:,.0f}, dense "
        f"{summary['tokens_per_second']['dense']:,.0f}",
        "", "| layer | non-zeros/token (TopK) | dead (TopK) | token entropy TopK | dense |",
        "|---|---|---|---|---|",
    ]
    for s in summary["sparsity_topk"]:
        layer = s["layer"]
        lines.append(f"| {layer} | {s['nonzero_mean']:.1f} | {s['dead_fraction']:.3f} | "
                     f"{summary['mean_token_entropy']['topk'][layer]:.3f} | "
                     f"{summary['mean_token_entropy']['dense'][layer]:.3f} |")
    lines += ["", "| neuron | concept | baseline freq. | best δ | steered freq. | ratio |",
              "|---|---|---|---|---|---|"]
    for s in summary["steering"]:
        concept = ", ".join(repr(t) for t in s["concept"][:6]).replace("|", "\\|")
        lines.append(f"| {s['neuron']} | {concept} | {s['baseline_frequency']:.3f} | "
                     f"{s['best_delta']:.2f} | {s['best_frequency']:.3f} | "
                     f"{s['best_ratio']:.1f}× |")
    best = summary["best_steering"]
    if best:
        lines += ["", f"Steered samples, neuron {best['neuron']} (δ = {best['delta']:.2f}):", ""]
        for prompt, text in best["steered_samples"].items():
            lines.append(f"- `{prompt}` → unsteered `{best['baseline_samples'][prompt]!r}`, "
                         f"steered `{text!r}`")
    lines += ["", f"checks: {summary['checks']}", ""]
    return "\n".join(lines)
