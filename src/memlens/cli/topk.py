"""``memlens topk train|neurons|steer|all|eval|formation|rome-keys``: TopK language models
(:mod:`memlens.topk`, the whole study in :mod:`memlens.studies.topk`, lm-evaluation-harness
tasks in :mod:`memlens.studies.organism_tasks`, neuron formation in
:mod:`memlens.topk.formation`, ROME keys in :mod:`memlens.studies.topk_edit`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    console,
    option,
    print_json,
    with_shared,
)
from memlens.studies.organism_tasks import DEFAULT_TASKS, HELDOUT, LOCAL_TASKS

topk_app = typer.Typer(help="Train TopK LMs, read their neurons, steer with them, evaluate them.",
                       no_args_is_help=True)

OrganismOpt = Annotated[str, typer.Option(
    "--organism", help="Organism (organism:NAME) or organism directory whose corpus, tokenizer "
    "and architecture the TopK model and its dense twin are trained on.")]
TextOpt = Annotated[str | None, typer.Option(
    "--corpus", help="Text file, organism:NAME or directory with corpus.txt (default: the "
    "model's own corpus.txt).")]

#: The options of `topk train` and `topk all`: what is trained and how.
TRAINING = [
    option("organism", OrganismOpt, DEFAULT_MODEL),
    option("out", OutOpt, Path("topk-run")),
    option("steps", Annotated[int, typer.Option("--steps", help="Optimizer steps per model.")],
           300),
    option("k", Annotated[int | None, typer.Option(
        "--k", help="Units kept per position (default d_ff/16).")], None),
    option("batch_size", Annotated[int, typer.Option("--batch-size",
                                                     help="Sequences per step.")], 16),
    option("lr", Annotated[float, typer.Option("--lr", help="Peak learning rate.")], 2e-3),
    option("n_last_nontopk", Annotated[int, typer.Option(
        "--n-last-nontopk", help="Final layers that stay dense.")], 2),
    option("anneal_ratio", Annotated[float, typer.Option(
        "--anneal-ratio", help="Share of steps over which α goes 1 → 0.")], 0.2),
    option("seed", Annotated[int, typer.Option(
        "--seed", help="Init and data-order seed (both models).")], 0),
    option("keep_steps", Annotated[str, typer.Option(
        "--keep-steps", help="Steps after which the TopK model is snapshotted into "
        "OUT/topk/snapshots/step-NNNNNN (for `topk formation`): comma-separated steps, 'log' "
        "(10, 20, 50, 100, 200, … and the last step) or 'none'.")], "log"),
]


def parse_keep_steps(text: str) -> tuple[int, ...] | None:
    """``--keep-steps``: 'log' → None (log-spaced default), 'none' → (), '10,50' → (10, 50)."""
    from memlens.topk_mlp import TopKError

    text = text.strip().lower()
    if text in ("log", ""):
        return None
    if text == "none":
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TopKError(f"--keep-steps takes comma-separated steps, 'log' or 'none', not "
                        f"{text!r}") from None


def _train_config(training):
    from memlens.topk.train import TopKTrainConfig

    return TopKTrainConfig(steps=training.steps, k=training.k, batch_size=training.batch_size,
                           lr=training.lr, n_last_nontopk=training.n_last_nontopk,
                           anneal_ratio=training.anneal_ratio, seed=training.seed,
                           keep_steps=parse_keep_steps(getattr(training, "keep_steps", "log")))


@topk_app.command("train")
@with_shared(TRAINING)
def topk_train(training, like_organism: Annotated[bool, typer.Option(
        "--like-organism", help="Train only the TopK model, on the organism's own training "
        "data with its recipe (steps, batch, lr, warm-up, bf16, seed; --steps, --batch-size "
        "and --lr are not used); the organism is the dense twin. OUT/topk becomes an organism "
        "directory (its CounterFact cases, corpus, editor settings).")] = False,
        as_json: JsonOpt = False):
    """Train a TopK model and its dense twin alike; held-out perplexity, sparsity, dead units."""
    from memlens.topk.data import organism_corpus, text_blocks
    from memlens.topk.train import train_pair

    out = training.out
    if like_organism:
        from memlens.studies.topk import organism_recipe, train_like_organism

        cfg = organism_recipe(training.organism, k=training.k,
                              n_last_nontopk=training.n_last_nontopk,
                              anneal_ratio=training.anneal_ratio,
                              keep_steps=parse_keep_steps(training.keep_steps))
        pair = train_like_organism(training.organism, out, cfg)
    else:
        corpus = organism_corpus(training.organism)
        train_blocks, heldout = text_blocks(corpus.tokenizer, corpus.text)
        pair = train_pair(corpus.config, corpus.tokenizer, train_blocks, heldout,
                          _train_config(training), out)
    result = pair.to_dict()
    (out / "pair.json").write_text(json.dumps(result, indent=1))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    steps = pair.config["steps"]
    table = Table(title=f"TopK vs dense twin ({training.organism}, {steps} steps)")
    for column in ("layer", "non-zeros/token TopK (min–max)", "dead TopK", "non-zeros dense"):
        table.add_column(column)
    for t, d in zip(pair.topk.sparsity, pair.dense.sparsity, strict=True):
        table.add_row(str(t["layer"]), f"{t['nonzero_mean']:.1f} ({t['nonzero_min']}–"
                      f"{t['nonzero_max']})", f"{t['dead_fraction']:.3f}", f"{d['nonzero_mean']:.1f}")
    console.print(table)
    console.print(f"held-out perplexity: TopK {pair.topk.heldout_ppl:.2f}, dense "
                  f"{pair.dense.heldout_ppl:.2f} (ratio {pair.ppl_ratio:.3f}); models in {out}")


def _neuron_text(corpus: str | None, model: str) -> str:
    from memlens.topk.data import read_corpus_text

    return read_corpus_text(corpus or model)


@topk_app.command("neurons")
def topk_neurons(
    model: ModelOpt = DEFAULT_MODEL,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="A second model (e.g. the dense twin) to plot against.")] = None,
    corpus: TextOpt = None,
    out: OutOpt = Path("topk-neurons"),
    max_blocks: Annotated[int, typer.Option("--max-blocks", help="Text blocks to read.")] = 512,
    embedder: Annotated[str | None, typer.Option(
        "--embedder", help="sentence-transformers model for semantic entropy (default: the "
        "LM's input embeddings).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Token and semantic entropy and top tokens of every neuron; entropy-by-layer figure."""
    from memlens.model import load_model
    from memlens.topk.data import neuron_blocks
    from memlens.topk.neurons import neuron_report, plot_entropy_by_layer

    text = _neuron_text(corpus, model)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name, ref in (("model", model), ("compare", compare)):
        if ref is None:
            continue
        handle = load_model(ref, device=device, dtype=dtype)
        blocks = neuron_blocks(handle.tokenizer, text, min(128, handle.max_length or 128),
                               max_blocks)
        reports[ref] = neuron_report(handle, blocks, embedder=embedder)
        (out / f"neurons_{name}.json").write_text(json.dumps(reports[ref].to_dict()))
    figure = plot_entropy_by_layer(reports, out / "entropy_by_layer.png")
    from rich.table import Table

    table = Table(title="mean neuron entropy by layer")
    table.add_column("layer")
    for ref in reports:
        table.add_column(f"{ref}: token (nats) / semantic (bits)")
    first = next(iter(reports.values()))
    for i, entry in enumerate(first.layers):
        cells = []
        for report in reports.values():
            e = report.layers[i]
            cells.append(f"{e.mean_token_entropy:.3f} / {e.mean_semantic_entropy:.3f}"
                         + (" (TopK)" if e.is_topk else ""))
        table.add_row(str(entry.layer), *cells)
    console.print(table)
    console.print(f"figure: {figure}; per-neuron results in {out}")


@topk_app.command("steer")
def topk_steer(
    model: ModelOpt = DEFAULT_MODEL,
    neuron: Annotated[str | None, typer.Option("--neuron", help="LAYER:UNIT, e.g. 2:117.")] = None,
    delta: Annotated[list[float] | None, typer.Option(
        "--delta", help="δ added to the neuron (repeatable). With --auto: multiples of the "
        "neuron's delta_scale, δ that adds a residual-stream norm (default 0.5 1 2 4).")] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt (repeatable).")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Pick low-semantic-entropy neurons.")] = False,
    n_auto: Annotated[int, typer.Option("--n-auto", help="Neurons to try with --auto.")] = 5,
    corpus: TextOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 20,
    out: OutOpt = Path("topk-steer"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Add δ to one neuron while generating; concept-token frequency steered vs unsteered."""
    from memlens.model import load_model
    from memlens.topk.data import neuron_blocks
    from memlens.topk.steer import DEFAULT_PROMPTS, steer_report
    from memlens.topk_mlp import TopKError

    if not auto and neuron is None:
        raise TopKError("give --neuron LAYER:UNIT or --auto")
    handle = load_model(model, device=device, dtype=dtype)
    text = _neuron_text(corpus, model)
    blocks = neuron_blocks(handle.tokenizer, text, min(128, handle.max_length or 128))
    prompts = list(prompt or DEFAULT_PROMPTS)
    picks = _auto_picks(handle, blocks, delta, n_auto) if auto else \
        _named_pick(handle, blocks, neuron, delta)
    results = [steer_report(handle, layer, unit, ids, deltas, prompts, max_new_tokens)
               for layer, unit, ids, deltas in picks if ids]
    if not results:
        raise TopKError("no neuron with concept tokens to steer (the neuron never fired on the "
                        "corpus, or --auto found no candidates)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "steer.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))
    from rich.table import Table

    table = Table(title=f"steering {model}")
    for column in ("neuron", "concept tokens", "δ", "freq. unsteered", "freq. steered", "ratio"):
        table.add_column(column)
    for r in results:
        for d in r.results:
            table.add_row(f"{r.layer}:{r.unit}", ", ".join(repr(t) for t in r.concept_tokens[:5]),
                          f"{d.delta:.2f}", f"{r.baseline.frequency:.3f}", f"{d.frequency:.3f}",
                          f"{d.ratio:.1f}×")
    console.print(table)
    best = max(results, key=lambda r: r.best_ratio)
    for p, text_out in zip(best.prompts, best.best.samples, strict=True):
        console.print(f"[bold]{p}[/] → {text_out!r}")
    console.print(f"results: {out / 'steer.json'}")


def _auto_picks(handle, blocks, delta: list[float] | None, n_auto: int) -> list[tuple]:
    """(layer, unit, concept token ids, deltas) of the neurons --auto picks."""
    from memlens.topk.neurons import neuron_report
    from memlens.topk.steer import auto_neurons

    return [(n.layer, n.unit, n.token_ids,
             [m * n.delta_scale for m in (delta or [0.5, 1.0, 2.0, 4.0])])
            for n in auto_neurons(neuron_report(handle, blocks), n=n_auto)]


def _named_pick(handle, blocks, neuron: str, delta: list[float] | None) -> list[tuple]:
    """(layer, unit, concept token ids, deltas) of --neuron LAYER:UNIT, checked."""
    from memlens.topk.neurons import neuron_report
    from memlens.topk.steer import parse_neuron
    from memlens.topk_mlp import TopKError

    layer, unit = parse_neuron(neuron)
    if not 0 <= layer < handle.n_layers:
        raise TopKError(f"layer {layer} does not exist (0 … {handle.n_layers - 1})")
    entry = neuron_report(handle, blocks, layers=[layer]).layer(layer)
    if not 0 <= unit < len(entry.top_token_ids):
        raise TopKError(f"unit {unit} does not exist (0 … {len(entry.top_token_ids) - 1})")
    return [(layer, unit, entry.top_token_ids[unit], list(delta or [10.0]))]


@topk_app.command("all")
@with_shared(TRAINING)
def topk_all(training):
    """Train TopK + dense twin, compare neuron entropies, steer auto-picked neurons; summary."""
    from memlens.studies.topk import run_all

    summary = run_all(training.organism, training.out, _train_config(training))
    console.print((training.out / "summary.md").read_text())
    console.print(f"[bold]checks:[/] {summary['checks']}  → {training.out / 'summary.json'}")


@topk_app.command("eval")
def topk_eval(
    model: ModelOpt = DEFAULT_MODEL,
    twin: Annotated[str | None, typer.Option(
        "--twin", help="A second model to compare with, e.g. the dense twin.")] = None,
    tasks: Annotated[str, typer.Option(
        "--tasks", help=f"Comma-separated: memlens' {', '.join(LOCAL_TASKS)} (harness tasks "
        f"over the organism's facts, offline), {HELDOUT} (held-out corpus perplexity), or any "
        "lm-evaluation-harness task (lambada_openai, hellaswag, arc_easy, ...).")]
    = ",".join(DEFAULT_TASKS),
    organism: Annotated[str | None, typer.Option(
        "--organism", help="Organism (organism:NAME or directory) whose facts and corpus the "
        "local tasks use (default: the model's or twin's directory if it has facts.json).")]
    = None,
    corpus: Annotated[str | None, typer.Option(
        "--corpus", help=f"Text of {HELDOUT}: a text file, organism:NAME or a directory with "
        "corpus.txt (default: the organism's).")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="At most this many items per task (for quick runs).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Harness batch size.")] = 32,
    bootstrap_iters: Annotated[int, typer.Option(
        "--bootstrap-iters", help="Bootstrap resamples for the harness's perplexity standard "
        "errors (0: none).")] = 10000,
    out: OutOpt = Path("topk-eval"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
):
    """Evaluate a (TopK) model and its twin with lm-evaluation-harness: accuracy and perplexity
    ± standard errors, the gap between the two; eval.json, eval.md and eval.png in --out."""
    from memlens.studies.organism_tasks import evaluate_pair

    table = evaluate_pair(model, twin, tasks, out=out, organism=organism, corpus=corpus,
                          limit=limit, batch_size=batch_size, bootstrap_iters=bootstrap_iters,
                          device=device, dtype=dtype)
    if as_json:
        print_json(table.to_dict())
        return
    typer.echo(table.to_markdown())  # plain markdown: readable here, pastes into docs
    typer.echo(f"table: {table.files['markdown']}, {table.files['json']}; "
               f"figure: {table.files['figure']}")


@topk_app.command("formation")
def topk_formation(
    run: Annotated[Path, typer.Option(
        "--run", help="A `topk train` output directory (or its topk/ model) with snapshots.")],
    corpus: Annotated[str, typer.Option(
        "--corpus", help="Text the neurons are read on: a text file, organism:NAME or a "
        "directory with corpus.txt.")] = DEFAULT_MODEL,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Directory for results and figures (default RUN/formation).")] = None,
    max_blocks: Annotated[int, typer.Option("--max-blocks", help="Text blocks to read.")] = 256,
    n_trajectories: Annotated[int, typer.Option(
        "--n-trajectories", help="Neurons in the concept-trajectory figure.")] = 8,
    embedder: Annotated[str | None, typer.Option(
        "--embedder", help="sentence-transformers model for semantic entropy (default: the "
        "LM's input embeddings).")] = None,
    as_json: JsonOpt = False,
):
    """Neuron formation over training: entropy by layer at every snapshot, when each neuron's
    concept (top token) settles, and the share stable over the last half of training."""
    from memlens.topk.formation import run_formation

    out = out if out is not None else run / "formation"
    report = run_formation(run, corpus, out, max_blocks=max_blocks,
                           n_trajectories=n_trajectories, embedder=embedder)
    if as_json:
        print_json({"summary": [e.summary() for e in report.layers],
                    "stable_fraction_topk": report.stable_fraction(True),
                    "stable_fraction_all": report.stable_fraction(False)})
        return
    typer.echo(report.to_markdown())
    typer.echo(f"results: {out / 'formation.json'}, {out / 'formation.md'}; figures: "
               f"{out / 'entropy_over_training.png'}, {out / 'concept_trajectories.png'}")


@topk_app.command("rome-keys")
def topk_rome_keys(
    model: ModelOpt = DEFAULT_MODEL,
    twin: Annotated[str, typer.Option("--twin", help="The dense twin to compare with.")] = "",
    organism: Annotated[str, typer.Option(
        "--organism", help="Organism whose counterfact.json, corpus and ROME settings are "
        "used.")] = DEFAULT_MODEL,
    n: Annotated[int, typer.Option("--n", help="CounterFact cases.")] = 20,
    layer: Annotated[int | None, typer.Option(
        "--layer", help="Edited layer (default: ROME's for the organism).")] = None,
    out: OutOpt = Path("topk-rome-keys"),
    efficacy: Annotated[bool, typer.Option(
        "--efficacy", help="Also edit each case with ROME on both models: ES/PS/NS/Score.")
    ] = False,
    as_json: JsonOpt = False,
):
    """How many units ROME's key activates in a TopK model vs its dense twin, and the concepts
    of the units the rank-one update changes most (largest |C⁻¹k*|); rome_keys.json/.md."""
    from memlens.studies.topk_edit import compare_rome_keys, keys_markdown
    from memlens.topk_mlp import TopKError

    if not twin:
        raise TopKError("give the dense twin with --twin DIR")
    results = compare_rome_keys(model, twin, organism, n=n, layer=layer, out=out,
                                efficacy=efficacy)
    if as_json:
        print_json({name: {**results[name]["summary"],
                           **({"counterfact": results[name]["counterfact"]} if efficacy else {})}
                    for name in ("topk", "dense")})
        return
    typer.echo(keys_markdown(results))
    typer.echo(f"results: {out / 'rome_keys.json'}")


def register(app: typer.Typer) -> None:
    app.add_typer(topk_app, name="topk")
