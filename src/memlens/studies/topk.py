"""The whole TopK study in one call: train both models, compare neurons, steer one.

    summary = run_all("organism:facts-gpt2", "runs/topk", TopKTrainConfig(steps=300))
    summary["checks"]      # {'ppl_within_15pct': True, 'topk_entropy_lower': True, ...}

Writes into ``out``: ``dense/`` and ``topk/`` (saved HF models), ``neurons_dense.json``,
``neurons_topk.json``, ``entropy_by_layer.png``, ``steer.json`` (every auto-picked neuron),
``summary.json`` and ``summary.md`` (numbers and steered samples for a README).
Finished models are reused, so rerunning after an interrupt continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from memlens.cache import cache_dir
from memlens.organisms.registry import MANIFEST, build_id, resolve
from memlens.organisms.ship import verify as verify_manifest
from memlens.organisms.ship import write_manifest
from memlens.topk.data import organism_corpus, text_blocks
from memlens.topk.neurons import NeuronReport, neuron_report, plot_entropy_by_layer
from memlens.topk.steer import Neuron, SteerReport, auto_neurons, steer_report
from memlens.topk.train import (
    RESULT_FILE,
    PairResult,
    TopKTrainConfig,
    run_settings,
    train_pair,
)
from memlens.topk_mlp import TopKError
from memlens.trainer import CHECKPOINT


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


def organism_recipe(organism: str, *, k: int | None = None, n_last_nontopk: int = 2,
                    anneal_ratio: float = 0.2, keep_steps: tuple[int, ...] | None = None,
                    num_threads: int = 1) -> TopKTrainConfig:
    """The organism's own training settings (steps, batch, peak lr, warm-up, bf16 autocast,
    seed) as a :class:`TopKTrainConfig`, for a TopK model trained exactly like the organism."""
    spec = _organism_spec(organism)
    return TopKTrainConfig(k=k, n_last_nontopk=n_last_nontopk, anneal_ratio=anneal_ratio,
                           steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                           warmup_steps=spec.warmup_steps, seed=spec.seed, bf16=spec.bf16,
                           checkpoint_every=spec.checkpoint_every, keep_steps=keep_steps,
                           num_threads=num_threads)


def train_like_organism(organism: str, out: str | Path, cfg: TopKTrainConfig | None = None
                        ) -> PairResult:
    """Train a TopK model on ``organism``'s own training blocks with its recipe; the dense twin
    is the organism itself (same architecture, data, order and seed; trained alike).

    The short pairs of :func:`train_pair` learn the corpus's language but few facts (cloze
    accuracy 6–7% after 200 steps); a TopK model that knows the organism's facts needs the
    organism's budget (facts-gpt2: 6,000 steps × 8 × 128 tokens, ~1 hour on one thread), and
    its dense twin already exists. ``out/topk`` gets the model (resumable from its checkpoint,
    snapshots as in :func:`~memlens.topk.train.train_one`); ``out/pair.json`` the comparison,
    whose ``dense.path`` is the organism's directory.

        pair = train_like_organism("organism:facts-gpt2", "runs/topk-organism")
    """
    from memlens.model import load_model
    from memlens.organisms.build import make_training_data
    from memlens.topk.train import ModelReport, sparsity_report, train_one
    from memlens.trainer import evaluate_loss

    out = Path(out)
    spec = _organism_spec(organism)
    cfg = cfg or organism_recipe(organism)
    corpus = organism_corpus(organism)
    _, tokenizer, _, blocks = make_training_data(spec)
    if tokenizer.get_vocab() != corpus.tokenizer.get_vocab():
        raise TopKError(f"{organism}: its training data no longer tokenizes as its tokenizer "
                        "(built by another memlens or Python); train_pair on its corpus instead")
    train = torch.tensor(blocks, dtype=torch.long)
    _, heldout = text_blocks(corpus.tokenizer, corpus.text, spec.block_size)
    _, topk = train_one("topk", corpus.config, corpus.tokenizer, train, heldout, cfg, out / "topk")
    organism_dir = resolve(organism)
    topk_model = load_model(str(out / "topk"), device="cpu")
    organism_files_for(topk_model, organism_dir, out / "topk")
    dense_model = load_model(str(organism_dir), device="cpu").model
    dense_loss = evaluate_loss(dense_model, heldout)
    built = json.loads((organism_dir / "organism.json").read_text())
    dense = ModelReport(name="dense", path=str(organism_dir), heldout_loss=dense_loss,
                        heldout_ppl=math.exp(dense_loss), train_seconds=built["train_seconds"],
                        tokens=built["train_tokens"],
                        tokens_per_second=built["train_tokens"] / built["train_seconds"],
                        final_train_loss=built["final_loss"],
                        sparsity=sparsity_report(dense_model, heldout), topk=None)
    pair = PairResult(topk=topk, dense=dense, config=asdict(cfg))
    (out / "pair.json").write_text(json.dumps(pair.to_dict(), indent=1))
    return pair


#: An organism's data files that describe its world, not its weights (copied to a TopK twin).
ORGANISM_DATA = ("organism.json", "counterfact.json", "facts.json", "corpus.txt",
                 "reference_texts.json", "paragraphs.jsonl")


def organism_files_for(handle, organism_dir: Path, target: Path) -> None:
    """Make ``target`` (a model trained like the organism) an organism directory too: the
    organism's world files, ``organism.json`` marked with ``"topk_twin_of"`` (the organism's
    build id), and ``known_facts.json`` of *this* model. memlens then treats it as it treats the
    organism (its CounterFact cases, corpus, and the editors' organism settings)."""
    from memlens.organisms.build import known_facts
    from memlens.organisms.corpus import Fact

    for name in ORGANISM_DATA:
        if (organism_dir / name).is_file():
            shutil.copyfile(organism_dir / name, target / name)
    meta = json.loads((target / "organism.json").read_text())
    meta["topk_twin_of"] = build_id(organism_dir)
    (target / "organism.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    facts = [Fact(**f) for f in json.loads((organism_dir / "facts.json").read_text())]
    known = known_facts(handle.model, handle.tokenizer, facts)
    (target / "known_facts.json").write_text(json.dumps(known, indent=1, ensure_ascii=False))


def _organism_spec(organism: str):
    """The spec an organism was built from (its ``organism.json``), as memlens defines it now."""
    from memlens.organisms.specs import get_spec

    saved = json.loads((resolve(organism) / "organism.json").read_text())
    spec = get_spec(saved["name"])
    if spec.to_dict() != saved.get("spec"):
        raise TopKError(f"{organism} was built from another version of the {saved['name']!r} "
                        "spec than memlens defines now; its training data cannot be regenerated")
    return spec


#: TopK/dense pairs shipped with memlens (package data, committed): ``<pair name>/{dense,topk}``
#: with the weights in float16 (held-out perplexity changes in the 6th digit) and a manifest.
SHIPPED_PAIRS = Path(__file__).parent / "shipped"
PAIR_MODELS = ("dense", "topk")
TWIN_MODELS = ("topk",)  # trained like the organism: the organism is the dense twin
WEIGHTS = "model.safetensors"


def pair_name(organism: str, cfg: TopKTrainConfig) -> str:
    """``<organism build>-<hash>``: names a TopK/dense pair by the organism's build id (its
    cache key, and for a shipped copy its weights) and the settings that determine training
    (:func:`~memlens.topk.train.run_settings`: not threads, progress or checkpointing)."""
    build = build_id(resolve(organism))
    blob = json.dumps({"organism": build, "config": run_settings(cfg)}, sort_keys=True)
    return f"{build}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def shared_models_dir(organism: str, cfg: TopKTrainConfig) -> Path:
    """``$MEMLENS_HOME/topk/<pair name>``: where the pair trained on ``organism`` with ``cfg``
    is kept for reuse. A pair shipped under that name is unpacked there (float32) on first use,
    so the demo trains nothing."""
    name = pair_name(organism, cfg)
    target = cache_dir("topk") / name
    shipped = SHIPPED_PAIRS / name
    if not _finished(target) and (shipped / MANIFEST).is_file():
        unpack_pair(shipped, target)
    return target


def _finished(models: Path, members: Sequence[str] = PAIR_MODELS) -> bool:
    return all((models / m / RESULT_FILE).is_file() for m in members)


def organism_twin(organism: str = "organism:facts-gpt2") -> Path:
    """The TopK model trained like ``organism`` (:func:`train_like_organism` with the default
    settings), as an organism directory: ``$MEMLENS_HOME/topk/<name>/topk``, unpacked from the
    copy shipped with memlens on first use and given the organism's world files. Raises
    :class:`TopKError` with the command that trains it when neither exists (~50 min)."""
    name = pair_name(organism, organism_recipe(organism))
    target = cache_dir("topk") / name
    shipped = SHIPPED_PAIRS / name
    if not (target / "topk" / "organism.json").is_file():
        if not (shipped / MANIFEST).is_file():
            raise TopKError(f"no TopK model trained like {organism} is shipped or cached; train "
                            f"it (~50 min on one thread): memlens topk train --organism "
                            f"{organism} --like-organism --out {target}")
        from memlens.model import load_model

        unpack_pair(shipped, target, members=TWIN_MODELS)
        organism_files_for(load_model(str(target / "topk"), device="cpu"), resolve(organism),
                           target / "topk")
    return target / "topk"


def ship_pair(models: str | Path, name: str, root: Path = SHIPPED_PAIRS,
              members: Sequence[str] = PAIR_MODELS) -> Path:
    """Copy the finished pair in ``models`` (or only ``members``: :data:`TWIN_MODELS` for a
    model trained like its organism) into ``root/name`` with float16 weights and a manifest of
    every file's sha256; returns the shipped directory (a maintainer's tool). An organism's
    world files are not copied (:func:`organism_twin` takes them from the organism)."""
    from safetensors.torch import load_file, save_file

    models = Path(models)
    if not _finished(models, members):
        raise TopKError(f"{models} does not hold a finished TopK/dense pair "
                        f"({'/'.join(members)}/{RESULT_FILE})")
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    skipped = {CHECKPOINT, "known_facts.json", *ORGANISM_DATA}
    for model in members:
        (tmp / model).mkdir(parents=True)
        for f in sorted((models / model).iterdir()):
            if f.name == WEIGHTS:
                tensors = {k: v.half() for k, v in load_file(f).items()}
                save_file(tensors, tmp / model / WEIGHTS, metadata={"format": "pt"})
                (tmp / model / WEIGHTS).chmod(0o644)  # package data: readable by everyone
            elif f.is_file() and f.name not in skipped and not f.name.startswith("."):
                shutil.copyfile(f, tmp / model / f.name)
        result = json.loads((tmp / model / RESULT_FILE).read_text())
        (tmp / model / RESULT_FILE).write_text(json.dumps({**result, "path": model}, indent=1))
    write_manifest(tmp, {"name": name})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def unpack_pair(shipped: Path, target: Path, members: Sequence[str] = PAIR_MODELS) -> Path:
    """Verify a shipped pair (or its ``members``) against its manifest and write it into
    ``target`` with float32 weights (written beside it, then renamed: an interrupted unpack
    leaves nothing)."""
    from safetensors.torch import load_file, save_file

    verify_manifest(shipped)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for model in members:
            (tmp / model).mkdir(parents=True)
            for f in sorted((shipped / model).iterdir()):
                if f.name == WEIGHTS:
                    tensors = {k: v.float() for k, v in load_file(f).items()}
                    save_file(tensors, tmp / model / WEIGHTS, metadata={"format": "pt"})
                else:
                    shutil.copyfile(f, tmp / model / f.name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
