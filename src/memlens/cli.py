"""The ``memlens`` command line: a thin layer over the Python API, one call per command.

Heavy imports (torch, transformers, matplotlib) happen inside commands so that
``memlens --help`` answers at once. Errors memlens raises on purpose print as one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Locate, edit, erase and steer what a transformer LM knows and has memorized.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local directory, or organism:NAME.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory for results and figures.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 or auto.")]

DEFAULT_MODEL = "organism:facts-gpt2"


def print_json(data: object) -> None:
    """Write ``data`` as JSON to stdout (no rich markup, so it pipes cleanly)."""
    typer.echo(json.dumps(data, indent=2, default=str))


# ── core ──────────────────────────────────────────────────────────────────────


@app.command()
def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False, device: DeviceOpt = None):
    """Architecture, sizes and the module names memlens edits."""
    from memlens.model import load_model

    handle = load_model(model, device=device)
    summary = handle.info()
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"memlens info: {model}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


# ── organisms (memlens.organisms) ────────────────────────────────────────────

organism_app = typer.Typer(help="Build and evaluate the model organisms memlens trains itself.",
                           no_args_is_help=True)
app.add_typer(organism_app, name="organism")

OrganismArg = Annotated[str, typer.Argument(help="Organism name (see `memlens organism list`).")]


@organism_app.command("list")
def organism_list(as_json: JsonOpt = False):
    """Known organisms: shipped (with memlens), cached (built here) or not built, and the path
    that loading each one uses."""
    from memlens.organisms.registry import ORGANISMS, is_built, organism_dir, shipped_copy

    rows = []
    for n, s in ORGANISMS.items():
        shipped, why_not = shipped_copy(n)
        cached = is_built(organism_dir(n))
        status = ("shipped" if shipped else "cached" if cached else "not built") + (
            f" (shipped copy unusable: {why_not})" if why_not else "")
        rows.append({"name": n, "status": status, "shipped": shipped is not None,
                     "cached": cached, "path": str(shipped or organism_dir(n)), "arch": s.arch,
                     "layers": s.n_layer, "d_model": s.d_model, "description": s.description})
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title="memlens organisms")
    for col in ("name", "arch", "size", "status", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["arch"], f"{r['layers']}×{r['d_model']}", r["status"],
                      r["description"])
    console.print(table)


@organism_app.command("build")
def organism_build(name: OrganismArg, as_json: JsonOpt = False,
                   from_scratch: Annotated[bool, typer.Option(
                       "--from-scratch", help="Ignore the shipped copy: train the organism into "
                       "the cache (facts-gpt2: ~1 h on 2 cores), or use the cache build.")] = False):
    """Print where an organism is (its shipped copy, or the cache build), building (training) it
    first if needed."""
    import time

    from memlens.organisms.registry import ensure

    start = time.perf_counter()
    path = ensure(name, progress=not as_json, from_scratch=from_scratch)
    meta = json.loads((path / "organism.json").read_text())
    summary = {"name": meta["name"], "path": str(path), "n_params": meta["n_params"],
               "n_facts": meta["n_facts"], "n_known_facts": meta["n_known_facts"],
               "train_seconds": meta["train_seconds"], "build_seconds": meta.get("build_seconds"),
               "command_seconds": round(time.perf_counter() - start, 1),
               "final_loss": meta["final_loss"]}
    if as_json:
        print_json(summary)
    else:
        for k, v in summary.items():
            console.print(f"{k}: {v}")


@organism_app.command("ship")
def organism_ship(name: OrganismArg, as_json: JsonOpt = False,
                  build: Annotated[Path | None, typer.Option(
                      "--build", help="Directory of the complete build to ship (default: the "
                      "cache build of the spec's current key).")] = None):
    """Maintainers only: copy a finished build into the package, with its MANIFEST.json
    (src/memlens/organisms/shipped/NAME/, committed to the repository), replacing the shipped
    copy. Run it in a repository checkout after `memlens organism build NAME --from-scratch`."""
    from memlens.organisms.ship import ship

    path = ship(name, build)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    summary = {"name": name, "path": str(path), "key": manifest["key"],
               "dtype": manifest["dtype"], "files": len(manifest["files"]),
               "mb": round(sum(manifest["sizes"].values()) / 2**20, 1)}
    if as_json:
        print_json(summary)
        return
    for k, v in summary.items():
        console.print(f"{k}: {v}")


@organism_app.command("eval")
def organism_eval(name: OrganismArg, as_json: JsonOpt = False,
                  recall_site: Annotated[bool, typer.Option(
                      "--recall-site/--no-recall-site",
                      help="Also run the averaged causal trace (issue 10; slower).")] = False):
    """Fact / paraphrase accuracy, memorized fraction by repeats, and (optionally) the recall
    site from causal tracing."""
    from memlens.missing import format_value
    from memlens.organisms.build import evaluate_organism
    from memlens.organisms.registry import ensure

    path = ensure(name, progress=not as_json)
    report = evaluate_organism(path, recall_site=recall_site)
    if as_json:
        print_json(report)
        return
    for k, v in report.items():
        console.print(f"{k}: {format_value(v)}")


# ── causal tracing (memlens.trace) ──────────────────────────────────────────


@app.command()
def trace(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The fact's prompt, e.g. "
                                        "'Toulouse is a city in'.")],
    subject: Annotated[str, typer.Option("--subject", "-s", help="Subject; must occur in the "
                                         "prompt.")],
    model: ModelOpt = DEFAULT_MODEL,
    kind: Annotated[str, typer.Option("--kind", help="hidden, mlp, attn, severed_mlp, "
                                      "severed_attn, severed (hidden + both severed) or all.")]
    = "all",
    samples: Annotated[int, typer.Option("--samples", help="Noise samples S.")] = 10,
    noise: Annotated[str | None, typer.Option("--noise", help="ν (a number), 'uniform' or "
                                              "'uniform:X'; default 3 × std of subject "
                                              "embeddings.")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Token to score (default: "
                                               "the model's prediction).")] = None,
    window: Annotated[int | None, typer.Option("--window", help="Layers restored together "
                                               "for mlp/attn (default: 10 on models of ≥ 28 "
                                               "layers, 10·L/48 on shallower ones).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: OutOpt = Path("memlens-trace"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Causal trace of one fact: heatmaps of P(answer) after restoring each (token, layer)."""
    from memlens.model import load_model
    from memlens.trace import trace_fact
    from memlens.trace.plot import plot_trace

    kinds = ("hidden", "severed_mlp", "severed_attn") if kind == "severed" else (kind,)
    handle = load_model(model, device=device)
    result = trace_fact(handle, prompt, subject, kinds=kinds, samples=samples,
                        noise=_noise_arg(noise), seed=seed, window=window, answer=answer)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "trace.json")
    figures = plot_trace(result, out, model_name=model)
    if as_json:
        print_json(result.to_json())
        return
    console.print(f"[bold]{prompt}[/] → {result.answer!r}: p_clean {result.p_clean:.3f}, "
                  f"p_corrupted {result.p_corrupted:.3f} (ν = {result.noise:.3g})")
    last = result.subject_range[1] - 1
    for name, scores in result.scores.items():
        layer = int(scores[last].argmax())
        console.print(f"  {name:12s} strongest at the last subject token: layer {layer} "
                      f"(p = {scores[last, layer]:.3f})")
    console.print(f"results: {out / 'trace.json'}; figures: {len(figures)} files in {out}")


FactFileOpt = Annotated[Path | None, typer.Option("--facts", help="JSON list of facts "
                                                  "(known-facts or CounterFact format); "
                                                  "default: the organism's known_facts.json.")]
RelationOpt = Annotated[str | None, typer.Option("--relation", help="Comma-separated relations "
                                                 "to keep (facts with a 'relation' field).")]


def _fact_file(model: str, facts: Path | None,
               missing: str = "--facts is required unless --model is organism:NAME") -> Path:
    """``--facts``, else the organism's known_facts.json; MemlensError(``missing``) when
    neither exists (a model that is not organism:NAME)."""
    if facts is not None:
        return facts
    from memlens.model import ORGANISM_PREFIX

    if not model.startswith(ORGANISM_PREFIX):
        raise MemlensError(missing)
    from memlens.organisms.registry import organism_file

    return organism_file(model, "known_facts.json")


def _chosen_facts(path: Path, n: int | None, relation: str | None) -> list[dict[str, str]]:
    """The facts of ``path`` (--facts), of the --relation(s) and thinned to --n."""
    from memlens.trace import load_facts, select_facts

    return select_facts(load_facts(path), n, relation.split(",") if relation else None)


def _save_results(out: Path, name: str, data: dict, figure) -> str:
    """Write ``out/<name>.json`` and the figure ``out/<name>.png``; the line that says where."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    figure.savefig(out / f"{name}.png", dpi=150, bbox_inches="tight")
    return f"results: {out / (name + '.json')}; figure: {out / (name + '.png')}"


def _fact_counts(avg) -> str:
    """How many facts an average over facts used and skipped, for its headline."""
    return (f"{avg.n_facts} facts, {avg.n_skipped_wrong} skipped (model wrong), "
            f"{avg.n_skipped_invalid} invalid")


def _layer_table(title: str, corner: str, n_layers: int):
    """A rich Table with a row-label column headed ``corner`` and one column per layer."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(corner)
    for layer in range(n_layers):
        table.add_column(str(layer), justify="right")
    return table


@app.command("trace-avg")
def trace_avg(
    model: ModelOpt = DEFAULT_MODEL,
    facts: FactFileOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Trace N facts spread evenly over the "
                                          "file (all relations keep their share).")] = None,
    relation: RelationOpt = None,
    kind: Annotated[str, typer.Option("--kind", help="Comma-separated kinds or 'all'.")]
    = "all",
    samples: Annotated[int, typer.Option("--samples", help="Noise samples S.")] = 10,
    noise: Annotated[str | None, typer.Option("--noise", help="ν, 'uniform' or 'uniform:X'.")]
    = None,
    window: Annotated[int | None, typer.Option("--window", help="Layers restored together "
                                               "for mlp/attn (default: 10 on models of ≥ 28 "
                                               "layers, 10·L/48 on shallower ones).")] = None,
    out: OutOpt = Path("memlens-trace-avg"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Average causal effects (AIE per token group × layer, ATE) over many known facts.

    Resumable: each traced fact is appended to $MEMLENS_HOME/traces/<model fingerprint>.jsonl
    and never traced again with the same settings (the demo and `organism eval --recall-site`
    share that cache).
    """
    from memlens.missing import format_value
    from memlens.model import load_model
    from memlens.trace import average_trace, trace_cache
    from memlens.trace.plot import plot_average

    facts = _fact_file(model, facts)
    handle = load_model(model, device=device)
    chosen = _chosen_facts(facts, n, relation)
    avg = average_trace(handle, chosen, kinds=kind.split(","), samples=samples,
                        noise=_noise_arg(noise), window=window, progress=not as_json,
                        resume=trace_cache(handle))
    if avg.n_facts == 0:
        first = f" (first: {avg.skipped[0]['reason']})" if avg.skipped else ""
        raise MemlensError(
            f"no fact could be traced, nothing to average: of {len(chosen)} facts from {facts}, "
            f"{avg.n_skipped_wrong} were skipped because the model's answer is not their "
            f"attribute and {avg.n_skipped_invalid} were invalid{first}; nothing was written")
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace_avg.json").write_text(json.dumps(avg.to_json(), indent=1))
    figures = plot_average(avg, out)
    if as_json:
        print_json(avg.to_json())
        return
    site = avg.recall_site()
    console.print(f"{avg.n_facts} facts traced, {avg.n_skipped_wrong} skipped (model wrong), "
                  f"{avg.n_skipped_invalid} invalid; ATE {avg.ate:.3f}")
    for place, label in (("aie_last_subject_token", "last subject token"),
                         ("aie_last_token", "last token")):
        peaks = ", ".join(f"{k} {format_value(v['max'], 3)} @ layer {format_value(v['layer'])}"
                          for k, v in site[place].items())
        console.print(f"  max AIE at the {label}: {peaks}")
    console.print(f"results: {out / 'trace_avg.json'}; figures: {len(figures)} files in {out}")


def _noise_arg(noise: str | None) -> float | str | None:
    """--noise as given: a number becomes a float, 'uniform[:X]' stays a string."""
    if noise is None or noise.startswith("uniform"):
        return noise
    try:
        return float(noise)
    except ValueError:
        raise MemlensError(f"--noise must be a number, 'uniform' or 'uniform:X', not {noise!r}")\
            from None


@app.command()
def probe(
    model: ModelOpt = DEFAULT_MODEL,
    facts: FactFileOpt = None,
    layers: Annotated[str | None, typer.Option("--layers", help="e.g. emb,0-4 or 2,5 (emb = "
                                               "after the embeddings; default: emb and every "
                                               "block).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Probe at most N facts, spread evenly "
                                          "over the file.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subject split and the "
                                      "shuffled control.")] = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of each "
                                                 "object's subjects held out.")] = 0.3,
    out: OutOpt = Path("memlens-probe"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """P-probing: held-out accuracy of linear probes of the fact's object, per token group and
    layer, with a shuffled-label control and the chance level."""
    from memlens.model import load_model
    from memlens.probe import GROUP_LABELS, layer_label, parse_probe_layers, plot_probe, probe_facts
    from memlens.trace import load_facts

    chosen = load_facts(_fact_file(model, facts))
    handle = load_model(model, device=device)
    result = probe_facts(handle, chosen, layers=parse_probe_layers(layers) if layers else None,
                         n=n, seed=seed, test_fraction=test_fraction, progress=not as_json)
    data = result.to_json()
    saved = _save_results(out, "probe", data, plot_probe(result, title=f"P-probe: {model}"))
    if as_json:
        print_json(data)
        return
    from rich.table import Table

    table = Table(title=f"held-out probe accuracy (shuffled-label control) — {model}")
    table.add_column("token group")
    for layer in result.layers:
        table.add_column(layer_label(layer), justify="right")
    table.add_column("chance", justify="right")
    for g, label in enumerate(GROUP_LABELS):
        if result.n_test[g]:
            table.add_row(label, *(f"{a:.2f} ({c:.2f})" for a, c in
                                   zip(result.accuracy[g], result.control[g], strict=True)),
                          f"{result.chance[g]:.2f}")
    console.print(table)
    best = result.best()
    console.print(f"{result.n_test[-1]} held-out facts in {len(result.relations)} relations; best: "
                  f"{best['group']} @ layer {layer_label(best['layer'])} accuracy "
                  f"{best['accuracy']:.3f} (control {best['control']:.3f}, chance "
                  f"{best['chance']:.3f})")
    for skipped in result.skipped:
        console.print(f"  skipped relation {skipped['relation']}: {skipped['reason']}")
    console.print(saved)


# ── recall anatomy: attention knockout and logit lens (memlens.knockout, memlens.lens) ──

FactPromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="One fact's prompt, "
                                                   "e.g. 'Toulouse is a city in'.")]
FactSubjectOpt = Annotated[str | None, typer.Option("--subject", "-s", help="Its subject; must "
                                                    "occur in the prompt.")]
FactsOpt = Annotated[Path | None, typer.Option("--facts", help="Average over a JSON list of facts "
                                               "(known-facts or CounterFact format); default "
                                               "without --prompt: the organism's "
                                               "known_facts.json.")]
FactsNOpt = Annotated[int | None, typer.Option("--n", help="Use N facts spread evenly over the "
                                               "file (all relations keep their share).")]


def _one_fact_or_many(model: str, prompt: str | None, subject: str | None,
                      facts: Path | None) -> Path | None:
    """None for one fact (--prompt and --subject), else the fact file to average over (on
    organisms, known_facts.json by default); one-line errors for inconsistent options."""
    if prompt is not None or subject is not None:
        if prompt is None or subject is None:
            raise MemlensError("give --prompt and --subject together (one fact), or --facts")
        if facts is not None:
            raise MemlensError("give either one fact (--prompt, --subject) or --facts, not both")
        return None
    return _fact_file(model, facts, "give --prompt and --subject, or --facts (a default fact "
                      "file exists only for --model organism:NAME)")


@app.command()
def knockout(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: FactPromptOpt = None,
    subject: FactSubjectOpt = None,
    facts: FactsOpt = None,
    n: FactsNOpt = None,
    relation: RelationOpt = None,
    window: Annotated[int | None, typer.Option("--window", help="Layers blocked together (default: "
                                               "Geva et al.'s 9 of 48, scaled to the model's "
                                               "depth).")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Token to score for one fact "
                                               "(default: the model's prediction).")] = None,
    out: OutOpt = Path("memlens-knockout"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Attention knockout (Geva et al. 2023): change of P(answer) when the last token cannot
    attend to the subject, to the other tokens or to itself, in each window of layers.

    One fact (--prompt, --subject) or the mean over many (--facts; resumable, each fact is
    appended to $MEMLENS_HOME/knockout/<model fingerprint>.jsonl).
    """
    from memlens.knockout import (
        SOURCE_LABELS,
        average_knockout,
        knockout_cache,
        knockout_fact,
        plot_knockout,
    )
    from memlens.model import load_model

    fact_file = _one_fact_or_many(model, prompt, subject, facts)
    if fact_file is None:
        handle = load_model(model, device=device)
        result = knockout_fact(handle, prompt, subject, window=window, answer=answer)
        data, name = result.to_json(), "knockout"
        relative = result.relative
        headline = (f"[bold]{prompt}[/] → {result.answer!r}: p_clean {result.p_clean:.3f}; "
                    f"blocked {result.window} layer(s) at a time")
    else:
        if answer is not None:
            raise MemlensError("--answer applies to one fact (--prompt); facts are scored on "
                               "the model's prediction")
        handle = load_model(model, device=device)
        chosen = _chosen_facts(fact_file, n, relation)
        result = average_knockout(handle, chosen, window=window, progress=not as_json,
                                  resume=knockout_cache(handle))
        data, name = result.to_json(), "knockout_avg"
        relative = result.relative
        headline = (f"{_fact_counts(result)}; mean p_clean {result.p_clean:.3f}; "
                    f"blocked {result.window} layer(s) at a time")
    saved = _save_results(out, name, data, plot_knockout(result))
    if as_json:
        print_json(data)
        return
    import math

    console.print(headline)
    table = _layer_table("% change in p(answer) when the last token cannot attend to …",
                         "source \\ layer", handle.n_layers)
    for source, curve in relative.items():
        table.add_row(SOURCE_LABELS[source], *("–" if math.isnan(v) else f"{100 * v:+.0f}"
                                               for v in curve))
    console.print(table)
    console.print(saved)


@app.command()
def lens(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: FactPromptOpt = None,
    subject: FactSubjectOpt = None,
    facts: FactsOpt = None,
    n: FactsNOpt = None,
    relation: RelationOpt = None,
    attributes: Annotated[Path | None, typer.Option("--attributes", help="JSON {subject: "
                                                    "[attributes]} or a fact list; default: the "
                                                    "organism's facts.json, else the --facts "
                                                    "file.")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Top tokens read per lens (default: 50 "
                                          "of 50,257, scaled to the vocabulary, ≥ 5).")] = None,
    kind: Annotated[str, typer.Option("--kind", help="Comma-separated: residual, mlp, attn.")]
    = "residual,mlp,attn",
    out: OutOpt = Path("memlens-lens"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Logit lens and attribute rate (Geva et al. 2023): the share of each layer's top tokens
    (residual stream, MLP and attention outputs, through the final norm and unembedding) that
    are attributes of the subject. One fact (--prompt, --subject) or the mean over --facts."""
    from memlens.lens import (
        KIND_LABELS,
        average_lens,
        lens_fact,
        load_attributes,
        plot_average_lens,
        plot_lens,
    )
    from memlens.model import ORGANISM_PREFIX, load_model

    fact_file = _one_fact_or_many(model, prompt, subject, facts)
    if attributes is None:
        if model.startswith(ORGANISM_PREFIX):
            from memlens.organisms.registry import organism_file

            attributes = organism_file(model, "facts.json")
        elif fact_file is not None:
            attributes = fact_file
        else:
            raise MemlensError("give --attributes FILE (JSON {subject: [attributes]}): the lens "
                               "needs the subject's attributes")
    known = load_attributes(attributes)
    kinds = [k_.strip() for k_ in kind.split(",") if k_.strip()]
    handle = load_model(model, device=device)
    if fact_file is None:
        if not known.get(subject):
            raise MemlensError(f"{attributes} lists no attributes for subject {subject!r}")
        result = lens_fact(handle, prompt, subject, known[subject], k=k, kinds=kinds)
        data, name = result.to_json(handle.tokenizer), "lens"
        figure = plot_lens(result)
        last = result.subject_range[1] - 1
        curves = {kind_: result.rate[kind_][last] for kind_ in result.rate}
        chance, top_k = result.chance, result.k
        headline = (f"[bold]{prompt}[/]: attributes of {subject!r}: "
                    f"{', '.join(result.attributes)}")
    else:
        chosen = _chosen_facts(fact_file, n, relation)
        result = average_lens(handle, chosen, known, k=k, kinds=kinds, progress=not as_json)
        data, name = result.to_json(), "lens_avg"
        figure = plot_average_lens(result)
        curves = {kind_: result.at(kind_) for kind_ in result.kinds}
        chance, top_k = result.chance, result.k
        headline = _fact_counts(result)
    saved = _save_results(out, name, data, figure)
    if as_json:
        print_json(data)
        return
    console.print(headline)
    table = _layer_table(f"attribute rate at the last subject token (top {top_k}; chance "
                         f"{chance:.3f})", "kind \\ layer", handle.n_layers)
    for kind_, curve in curves.items():
        table.add_row(KIND_LABELS[kind_], *(f"{v:.2f}" for v in curve))
    console.print(table)
    if fact_file is not None:
        peaks = ", ".join(f"{KIND_LABELS[kind_]} {v['rate']:.3f} @ layer {v['layer']}"
                          for kind_, v in result.peak("last").items())
        console.print(f"  highest rate at the last token: {peaks}")
    elif "residual" in result.top:
        layer = int(curves["residual"].argmax())
        words = result.top_at("residual", last, layer, handle.tokenizer)
        console.print(f"  residual top tokens at the last subject token, layer {layer}: "
                      f"{', '.join(repr(w) for w in words)}")
    console.print(saved)


# ── statistics, editing and evaluation (memlens.stats, memlens.edit, memlens.evaluate) ──

edit_app = typer.Typer(help="Edit facts: ROME, MEMIT, fine-tuning baselines.",
                       no_args_is_help=True)
app.add_typer(edit_app, name="edit")
eval_app = typer.Typer(help="Evaluate a model or an editor (CounterFact, zsRE).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

CorpusOpt = Annotated[str | None, typer.Option(
    "--corpus", help="Text/JSONL file, dataset dir or HF dataset name (default: the model's "
    "corpus.txt).")]
HParamsOpt = Annotated[Path | None, typer.Option("--hparams", help="JSON/YAML file overriding "
                                                 "hyper-parameters.")]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="Layer to edit (default: from a "
                                              "causal trace, else the middle layer).")]


@app.command()
def stats(
    layers: Annotated[str, typer.Option("--layers", help="e.g. 3-8 or 2,5,7.")],
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Corpus samples (texts).")] = 1000,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per "
                                              "forward pass.")] = 2048,
    max_len: Annotated[int, typer.Option("--max-len", help="Tokens per sample (≤ context).")]
    = 256,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Second moments C = E(k kᵀ) of the MLP keys of many layers, in one cached pass."""
    from memlens.model import load_model
    from memlens.stats import layer_stats, parse_layers

    handle = load_model(model, device=device)
    result = layer_stats(handle, parse_layers(layers), corpus=corpus, n_samples=samples,
                         batch_tokens=batch_tokens, max_len=max_len, progress=not as_json)
    rows = [s.meta() for s in result.values()]
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"key statistics: {model}")
    for column in ("layer", "tokens", "d_ff", "trace(C)", "corpus"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['count']:,}", str(r["d_ff"]), f"{r['trace']:.4g}",
                      r["corpus"])
    console.print(table)


AllowNoEffectOpt = Annotated[bool, typer.Option(
    "--allow-no-effect", help="Keep (and --save) an edit that did not take: P(target_new) did "
    "not rise, target_new is not preferred, or the optimisation loss did not fall.")]


def _save_if_took(handle, edit, result: dict, save: Path | None, allow_no_effect: bool) -> None:
    """Save the edited model to ``save`` unless the edit did not take (then nothing is written,
    unless ``allow_no_effect``); records ``took`` and ``saved`` in ``result``."""
    from memlens.edit import save_edited

    result["took"] = edit.took
    if save is not None and (edit.took is not False or allow_no_effect):
        result["saved"] = str(save_edited(handle, save, edit))


def _finish_edit(edit, result: dict, save: Path | None, allow_no_effect: bool,
                 as_json: bool) -> None:
    """Print ``result`` as JSON (or where the model was saved), then raise EditDidNotTake (one
    line, non-zero exit) when the edit did not take, after undoing it; with
    ``allow_no_effect`` print a warning instead."""
    from memlens.errors import EditDidNotTake

    if as_json:
        print_json(result)
    elif "saved" in result:
        console.print(f"  saved: {result['saved']}")
    elif save is None:
        console.print("  (not saved: pass --save DIR to keep the edited model)")
    if edit.took is not False:
        return
    reason = edit.log["outcome"]["reason"]
    if allow_no_effect:
        if not as_json:
            console.print(f"[yellow]warning: the edit did not take ({reason}); kept because of "
                          "--allow-no-effect[/]")
        return
    edit.undo()
    raise EditDidNotTake(f"the edit did not take: {reason}; nothing was saved (pass "
                         "--allow-no-effect to keep it anyway)")


def _print_fact_check(handle, request, title: str, show: bool = True) -> dict:
    """P(target_new), P(target_true) (``missing(reason)`` without a target_true) and the
    greedy answer for one request, printed when ``show``."""
    from memlens.edit.requests import greedy_answer
    from memlens.evaluate.scoring import score_targets
    from memlens.missing import format_value, missing

    targets = [request.target_new] + ([request.target_true] if request.target_true else [])
    scores = score_targets(handle, [request.text] * len(targets), targets)
    answer = handle.tokenizer.decode(greedy_answer(handle, request.text, 3))
    row = {"p_new": scores[0].prob, "p_true": scores[1].prob if len(scores) > 1 else
           missing("the request gives no target_true"), "greedy": answer}
    if show:
        console.print(f"  {title:6s} p(new) {row['p_new']:.3g}, p(true) "
                      f"{format_value(row['p_true'], 3)}; greedy: {answer!r}")
    return row


@edit_app.command("rome")
def edit_rome(
    request_file: Annotated[Path, typer.Option("--request", help="JSON: {prompt, subject, "
                                               "target_new} or a CounterFact record.")],
    model: ModelOpt = DEFAULT_MODEL,
    layer: LayerOpt = None,
    update: Annotated[str | None, typer.Option(
        "--update", help="Which keys the rank-one update inserts: mean (k* averaged over "
        "contexts), legacy (the reference code's bare-prompt key), both (δ at k* and at the "
        "bare key). Default: the model's hparams.")] = None,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    save: Annotated[Path | None, typer.Option("--save", help="New directory for the edited "
                                              "model.")] = None,
    allow_no_effect: AllowNoEffectOpt = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """One ROME edit, evaluated before and after; --save writes the edited model."""
    from memlens.edit import ROMEHyperParams, apply_rome, load_requests
    from memlens.model import load_model

    requests = load_requests(request_file)
    if len(requests) != 1:
        raise MemlensError(f"{request_file} holds {len(requests)} requests; ROME edits one "
                           "(use `memlens edit memit` for many)")
    request = requests[0]
    handle = load_model(model, device=device)
    hp = ROMEHyperParams.for_model(handle, path=hparams_file, update=update)
    if not as_json:
        console.print(f"[bold]ROME[/] {request.describe()}")
    before = _print_fact_check(handle, request, "before", show=not as_json)
    edit = apply_rome(handle, request, layer=layer, hparams=hp, corpus=corpus,
                      progress=not as_json)
    after = _print_fact_check(handle, request, "after", show=not as_json)
    result = {**edit.to_dict(), "before": before, "after": after}
    _save_if_took(handle, edit, result, save, allow_no_effect)
    if as_json:
        _finish_edit(edit, result, save, allow_no_effect, as_json)
        return
    console.print(f"  layer {edit.layer} ({edit.log['layer_source']}), ‖ΔW‖ "
                  f"{edit.delta_norms[edit.layer]:.4g}, v* loss "
                  f"{edit.log['v_star']['loss_first']:.3g} → "
                  f"{edit.log['v_star']['loss_last']:.3g}, P(target_new) "
                  f"{edit.log['v_star']['prob_before']:.3g} → "
                  f"{edit.log['v_star']['prob_after']:.3g}")
    _finish_edit(edit, result, save, allow_no_effect, as_json)


@eval_app.command("counterfact")
def eval_counterfact(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[str | None, typer.Option("--data", help="CounterFact JSON (default: the "
                                             "model's counterfact.json).")] = None,
    edit: Annotated[str, typer.Option("--edit", help="rome, memit, ft or none.")] = "none",
    n: Annotated[int | None, typer.Option("--n", help="First N cases.")] = None,
    layer: LayerOpt = None,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    references: Annotated[Path | None, typer.Option("--references", help="reference_texts.json "
                                                    "or a corpus, for RS.")] = None,
    generation: Annotated[bool, typer.Option("--generation/--no-generation",
                                             help="Generate text for GE and RS.")] = True,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens")] = 50,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write counterfact.json "
                                             "(all cases) here.")] = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """ES/PS/NS (+EM/PM/NM), Score, GE, RS before and after editing each case alone."""
    from memlens.evaluate import (
        GenerationConfig,
        ReferenceTexts,
        evaluate_counterfact,
        load_counterfact,
    )
    from memlens.evaluate.counterfact import resolve_data
    from memlens.missing import format_value
    from memlens.model import load_model

    handle = load_model(model, device=device)
    path = resolve_data(data, handle)
    cases = load_counterfact(path, n=n)
    refs = ReferenceTexts.load(references) if references else ReferenceTexts.for_data(handle, path)
    hp = None
    if edit == "rome":
        from memlens.edit import ROMEHyperParams

        hp = ROMEHyperParams.for_model(handle, path=hparams_file)
    result = evaluate_counterfact(
        handle, cases, editor=edit, layer=layer, hparams=hp, corpus=corpus, references=refs,
        generation=GenerationConfig(max_new_tokens=gen_tokens) if generation else None,
        progress=not as_json,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "counterfact.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    if as_json:
        print_json(result.summary)
        return
    from rich.table import Table

    table = Table(title=f"CounterFact: {model}, {len(result.cases)} cases, editor {edit}"
                  + (f" (layer {result.extra.get('layer')})" if edit == "rome" else ""))
    for column in ("metric", "pre", "post"):
        table.add_column(column, justify="right")
    for key, value in {**result.summary, "ACC": result.extra["ACC"]}.items():
        table.add_row(key, format_value(value["pre"]), format_value(value["post"]))
    console.print(table)
    if result.extra["skipped"]:
        console.print(f"skipped {len(result.extra['skipped'])} case(s); first: "
                      f"{result.extra['skipped'][0]['reason']}")


# ── MEMIT, fine-tuning baselines, scaling curve (memlens.edit.memit/finetune/scaling) ──

RequestsOpt = Annotated[Path, typer.Option("--requests", help="JSON/JSONL: flat requests "
                                           "{prompt, subject, target_new} or CounterFact records.")]
SaveOpt = Annotated[Path | None, typer.Option("--save", help="New directory for the edited model.")]
NOpt = Annotated[int | None, typer.Option("--n", help="Only the first N requests.")]


def _batch_check(handle, requests) -> dict:
    """Over many requests: mean P(target_new) and, where target_true is known, the share with
    P(new) > P(true) (efficacy; ``missing(reason)`` when no request gives target_true)."""
    from memlens.evaluate.scoring import score_targets
    from memlens.missing import missing

    new = score_targets(handle, [r.text for r in requests], [r.target_new for r in requests])
    known = [(i, r) for i, r in enumerate(requests) if r.target_true]
    true = score_targets(handle, [r.text for _, r in known], [r.target_true for _, r in known]) \
        if known else []
    wins = [new[i].nll < t.nll for (i, _), t in zip(known, true, strict=True)]
    return {"p_new": sum(s.prob for s in new) / len(new),
            "efficacy": sum(wins) / len(wins) if wins else missing(
                "no request gives target_true to compare P(target_new) with")}


def _report_batch_edit(handle, edit, requests, before: dict, save: Path | None, as_json: bool,
                       detail: str, allow_no_effect: bool) -> None:
    from memlens.missing import format_value

    after = _batch_check(handle, requests)
    result = {**edit.to_dict(), "before": before, "after": after}
    _save_if_took(handle, edit, result, save, allow_no_effect)
    if as_json:
        _finish_edit(edit, result, save, allow_no_effect, as_json)
        return
    for title, row in (("before", before), ("after", after)):
        console.print(f"  {title:6s} mean p(new) {row['p_new']:.3g}, efficacy "
                      f"{format_value(row['efficacy'], 3)}")
    console.print(f"  {detail}; ‖ΔW‖ " + ", ".join(f"L{k} {v:.4g}"
                                                  for k, v in edit.delta_norms.items()))
    _finish_edit(edit, result, save, allow_no_effect, as_json)


@edit_app.command("memit")
def edit_memit(
    request_file: RequestsOpt,
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str | None, typer.Option("--layers", help="Band R, e.g. 1-3 (default: "
                                               "from a causal trace, else a middle band).")]
    = None,
    n: NOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Edits per sequential "
                                                   "MEMIT batch (default: all at once).")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Drop requests the model "
                                               "already satisfies instead of failing.")] = False,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    save: SaveOpt = None,
    allow_no_effect: AllowNoEffectOpt = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Many edits at once with MEMIT, evaluated before and after; --save writes the model."""
    from memlens.edit import load_requests
    from memlens.edit.memit import MEMITHyperParams, apply_memit
    from memlens.model import load_model
    from memlens.stats import parse_layers

    requests = _first_requests(load_requests(request_file), n)
    handle = load_model(model, device=device)
    hp = MEMITHyperParams.for_model(handle, path=hparams_file, batch_size=batch_size)
    if not as_json:
        console.print(f"[bold]MEMIT[/] {len(requests)} request(s), e.g. {requests[0].describe()}")
    before = _batch_check(handle, requests)
    edit = apply_memit(handle, requests, layers=parse_layers(layers) if layers else None,
                       hparams=hp, corpus=corpus, skip_invalid=skip_invalid,
                       progress=not as_json)
    z = edit.log["z"]
    _report_batch_edit(handle, edit, requests, before, save, as_json,
                       f"layers {edit.layers} ({edit.log['layer_source']}), z: P(new) "
                       f"{z['prob_before']:.3g} → {z['prob_after']:.3g}, "
                       f"{len(edit.log['skipped'])} skipped, {edit.log['seconds']:.1f}s",
                       allow_no_effect)


def _first_requests(requests: list, n: int | None) -> list:
    """The first ``n`` requests (all when ``n`` is None); ``n`` must be ≥ 1."""
    if n is not None and n < 1:
        raise MemlensError(f"--n must be ≥ 1, got {n}")
    return requests[:n]


def _edit_ft(kind: str, request_file: Path, model: str, layer: int | None, n: int | None,
             hparams_file: Path | None, save: Path | None, as_json: bool,
             device: str | None, allow_no_effect: bool) -> None:
    from memlens.edit import load_requests
    from memlens.edit.finetune import FTHyperParams, apply_ft
    from memlens.model import load_model

    requests = _first_requests(load_requests(request_file), n)
    handle = load_model(model, device=device)
    hp = FTHyperParams.constrained(handle, path=hparams_file) if kind == "ft-l" else \
        FTHyperParams.for_model(handle, path=hparams_file)
    if not as_json:
        console.print(f"[bold]{kind.upper()}[/] {len(requests)} request(s), e.g. "
                      f"{requests[0].describe()}")
    before = _batch_check(handle, requests)
    edit = apply_ft(handle, requests, layer=layer, hparams=hp, progress=not as_json)
    _report_batch_edit(handle, edit, requests, before, save, as_json,
                       f"layer {edit.layer} ({edit.log['layer_source']}), loss "
                       f"{edit.log['loss_first']:.3g} → {edit.log['loss_last']:.3g}, "
                       f"max |ΔW| {edit.log['max_abs_change']:.3g}", allow_no_effect)


@edit_app.command("ft")
def edit_ft(request_file: RequestsOpt, model: ModelOpt = DEFAULT_MODEL, layer: LayerOpt = None,
            n: NOpt = None, hparams_file: HParamsOpt = None, save: SaveOpt = None,
            allow_no_effect: AllowNoEffectOpt = False, as_json: JsonOpt = False,
            device: DeviceOpt = None):
    """Baseline FT: fine-tune one layer's MLP output matrix on the requests."""
    _edit_ft("ft", request_file, model, layer, n, hparams_file, save, as_json, device,
             allow_no_effect)


@edit_app.command("ft-l")
def edit_ft_l(request_file: RequestsOpt, model: ModelOpt = DEFAULT_MODEL, layer: LayerOpt = None,
              n: NOpt = None, hparams_file: HParamsOpt = None, save: SaveOpt = None,
              allow_no_effect: AllowNoEffectOpt = False, as_json: JsonOpt = False,
              device: DeviceOpt = None):
    """Baseline FT-L: FT with |W − W₀| ≤ ε (5e-4 unless --hparams sets norm_constraint)."""
    _edit_ft("ft-l", request_file, model, layer, n, hparams_file, save, as_json, device,
             allow_no_effect)


@app.command("bench-edits")
def bench_edits_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    sizes: Annotated[str, typer.Option("--sizes", help="Numbers of edits, e.g. 1,10,100,1000.")]
    = "1,10,100,1000",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: memit, rome, ft-l, "
                                         "ft.")] = "memit,rome,ft-l",
    data: Annotated[str | None, typer.Option("--data", help="CounterFact JSON (default: the "
                                             "model's counterfact.json).")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="MEMIT band R, e.g. 1-3.")]
    = None,
    layer: Annotated[int | None, typer.Option("--layer", help="Layer of ROME and FT-L.")] = None,
    ge_cases: Annotated[int, typer.Option("--ge-cases", help="Cases whose generations give "
                                          "GE.")] = 20,
    corpus: CorpusOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for scaling.json, "
                                      "scaling.png and the resumable points.jsonl.")]
    = Path("bench-edits"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Score/ES/PS/NS, GE and wall time vs number of edits for MEMIT, sequential ROME, FT-L."""
    from memlens.edit.scaling import bench_edits, parse_sizes
    from memlens.evaluate import load_counterfact
    from memlens.evaluate.counterfact import resolve_data
    from memlens.missing import format_value
    from memlens.model import load_model
    from memlens.stats import parse_layers

    handle = load_model(model, device=device)
    size_list = parse_sizes(sizes)
    cases = load_counterfact(resolve_data(data, handle))
    result = bench_edits(handle, cases, size_list,
                         methods=[m.strip() for m in methods.split(",") if m.strip()],
                         layers=parse_layers(layers) if layers else None, layer=layer,
                         corpus=corpus, ge_cases=ge_cases, out_dir=out, progress=not as_json)
    if as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"editing {model}: quality vs number of edits")
    for column in ("method", "n", "Score", "ES", "PS", "NS", "GE", "seconds"):
        table.add_column(column, justify="right")
    for row in [result.explained(n, {"method": "unedited", "n": n, **result.pre[n],
                                     "seconds": ""}) for n in result.sizes] + result.table():
        table.add_row(row["method"], str(row["n"]), *(format_value(row[k], 3) for k in
                      ("Score", "ES", "PS", "NS", "GE")), format_value(row["seconds"], 3))
    console.print(table)
    console.print(f"written: {out / 'scaling.json'}, {out / 'scaling.png'}")


# ── paragraph memorization (memlens.memorization) ───────────────────────────

memorization_app = typer.Typer(help="Find, localize, unlearn and edit memorized paragraphs.",
                               no_args_is_help=True)
app.add_typer(memorization_app, name="memorization")

CorpusOpt = Annotated[str | None, typer.Option(
    "--corpus", "-c", help="Paragraphs: .jsonl (text or token_ids), .txt (blank-line separated), "
    "hf:NAME[:CONFIG[:SPLIT]]; default: the organism's paragraphs.jsonl.")]
PrefixOpt = Annotated[int, typer.Option("--prefix-len", help="Prompt tokens (paper: 50).")]
SuffixOpt = Annotated[int, typer.Option("--suffix-len", help="Tokens to reproduce (paper: 50).")]
MpOpt = Annotated[int | None, typer.Option("--mp-min-em",
                                           help="EM ≥ this is memorized (default: suffix).")]
NmpOpt = Annotated[int, typer.Option("--nmp-max-em", help="EM ≤ this is non-memorized.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use the first N paragraphs.")]
MaxOpt = Annotated[int, typer.Option("--max-paragraphs",
                                     help="MP (and NMP) paragraphs used beyond the scan.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Adam learning rate (paper: 1e-5; small "
                                      "organisms need ~1e-2).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps (reference: 5).")]
FracOpt = Annotated[float, typer.Option("--fraction", help="Share of weights in the mask.")]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay (paper: 1.0).")]
SaveOpt = Annotated[Path | None, typer.Option(
    "--save", help="Apply the sparse update and save the edited model to this NEW directory.")]


def _memorization_inputs(model, corpus, prefix_len, suffix_len, limit, device, out, **settings):
    """Load the model and paragraphs; build the pipeline settings."""
    from memlens.memorization.data import load_paragraphs
    from memlens.memorization.pipeline import Settings
    from memlens.model import load_model

    handle = load_model(model, device=device)
    paragraphs = load_paragraphs(handle, corpus, prefix_len=prefix_len, suffix_len=suffix_len,
                                 limit=limit)
    out.mkdir(parents=True, exist_ok=True)
    return handle, paragraphs, Settings(prefix_len=prefix_len, **settings)


def _memorization_done(data: dict, out: Path, as_json: bool, title: str) -> None:
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{title}[/]")
    for key, value in data.items():
        console.print(f"  {key}: {value}")
    console.print(f"[green]results and figures:[/] {out}")


@memorization_app.command("scan")
def memorization_scan(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None,
):
    """Greedy exact match and suffix NLL of every paragraph; MP / NMP counts by repeats."""
    from memlens.memorization.pipeline import run_scan

    handle, paragraphs, s = _memorization_inputs(
        model, corpus, prefix_len, suffix_len, limit, device, out, mp_min_em=mp_min_em,
        nmp_max_em=nmp_max_em, progress=not as_json)
    result = run_scan(handle, paragraphs, out, s)
    if as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"memorization scan: {model} ({len(paragraphs)} paragraphs)")
    for column in ("repeats", "n", "MP", "NMP", "between", "mean_em", "mean_nll"):
        table.add_column(column, justify="right")
    for row in result.table():
        table.add_row(*(str(row[c]) for c in ("repeats", "n", "MP", "NMP", "between",
                                                "mean_em", "mean_nll")))
    console.print(table)
    console.print(f"[green]results and figures:[/] {out}")


@memorization_app.command("perturb")
def memorization_perturb(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None, max_paragraphs: MaxOpt = 32,
    mode: Annotated[str, typer.Option("--mode", help="model (2nd/1st choice) or random.")] = "model",
    seed: Annotated[int, typer.Option("--seed")] = 0,
):
    """Swap each prefix token of the memorized paragraphs; EM/NLL drop per position; PMPs."""
    from memlens.memorization.pipeline import run_perturb

    handle, paragraphs, s = _memorization_inputs(
        model, corpus, prefix_len, suffix_len, limit, device, out, mp_min_em=mp_min_em,
        nmp_max_em=nmp_max_em, max_mp=max_paragraphs, perturb_mode=mode, seed=seed,
        progress=not as_json)
    result = run_perturb(handle, paragraphs, out, s)
    drop = result.em_drop.float().mean(0)
    _memorization_done({
        "paragraphs": len(result.ids), "mode": result.mode,
        "most_damaging_position": result.positions[int(drop.argmax())],
        "mean_em_drop_max": round(float(drop.max()), 2),
        "pmp_positions": result.pmp_position,
    }, out, as_json, f"token perturbation: {model}")


@memorization_app.command("attribute")
def memorization_attribute(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None, max_paragraphs: MaxOpt = 32,
):
    """|∂NLL/∂θ| per layer, head (W_Q/K/V/O) and MLP matrix on MP vs NMP, and of the CO."""
    from memlens.memorization.pipeline import run_attribute

    handle, paragraphs, s = _memorization_inputs(
        model, corpus, prefix_len, suffix_len, limit, device, out, mp_min_em=mp_min_em,
        nmp_max_em=nmp_max_em, max_mp=max_paragraphs, max_nmp=max_paragraphs,
        progress=not as_json)
    result = run_attribute(handle, paragraphs, out, s)
    if as_json:
        print_json(result.to_dict())
        return
    diff = result.mp.values - result.nmp.values
    top = int(diff.flatten().argmax())
    _memorization_done({
        "layer_share_mp": [round(float(v), 3) for v in result.mp.layer_sum / result.mp.layer_sum.sum()],
        "layer_share_nmp": [round(float(v), 3) for v in result.nmp.layer_sum / result.nmp.layer_sum.sum()],
        "largest MP − NMP": f"layer {top // diff.shape[1]} {result.columns[top % diff.shape[1]]}",
    }, out, False, f"gradient attribution: {model}")


@memorization_app.command("heads")
def memorization_heads(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None, max_paragraphs: MaxOpt = 32,
):
    """Attention to rare prefix tokens per head (Kendall τ vs corpus frequency); KQ heatmap."""
    from memlens.memorization.pipeline import run_heads

    handle, paragraphs, s = _memorization_inputs(
        model, corpus, prefix_len, suffix_len, limit, device, out, mp_min_em=mp_min_em,
        nmp_max_em=nmp_max_em, max_mp=max_paragraphs, progress=not as_json)
    result = run_heads(handle, paragraphs, out, s)
    data = result.to_dict()
    _memorization_done(data if as_json else {
        "candidate memorization head": f"layer {result.candidate[0]} head {result.candidate[1]}",
        "tau": round(data["candidate_tau"], 3), "rare_mass": round(data["candidate_rare_mass"], 3),
    }, out, as_json, f"memorization heads: {model}")


def _memorization_update(mode, model, corpus, out, as_json, device, prefix_len, suffix_len,
                         mp_min_em, nmp_max_em, limit, max_paragraphs, lr, steps, fraction,
                         weight_decay, save, allow_no_effect):
    from memlens.memorization.pipeline import run_updates
    from memlens.memorization.sparse import save_model

    handle, paragraphs, s = _memorization_inputs(
        model, corpus, prefix_len, suffix_len, limit, device, out, mp_min_em=mp_min_em,
        nmp_max_em=nmp_max_em, max_mp=max_paragraphs, max_nmp=max_paragraphs, lr=lr,
        steps=steps, fraction=fraction, weight_decay=weight_decay, progress=not as_json)
    results = run_updates(handle, paragraphs, out, s, mode=mode,
                          keep="sparse" if save else None)
    data = {r.method: {"before": r.before, "after": r.after, "n_weights": r.mask.n_selected,
                       "took": r.took} for r in results}
    if save:
        sparse = next(r for r in results if r.method == "sparse")
        if not sparse.took and not allow_no_effect:
            from memlens.errors import EditDidNotTake

            sparse.edit.undo()
            raise EditDidNotTake(f"the edit did not take: {sparse.why_not()}; nothing was saved "
                                 "(raise --lr/--steps, or pass --allow-no-effect to save anyway)")
        data["saved"] = str(save_model(handle, save, sparse.edit))
        sparse.edit.undo()
    if as_json:
        print_json(data)
        return
    from rich.table import Table

    keys = [k for k in ("mp_em", "mp_nll", "nmp_em", "nmp_nll", "target_em", "perplexity")
            if k in results[0].before]
    table = Table(title=f"memorization {mode}: {model} (lr {lr}, {steps} steps)")
    table.add_column("method")
    table.add_column("weights", justify="right")
    for k in keys:
        table.add_column(f"{k} before → after", justify="right")
    for r in results:
        table.add_row(r.method, f"{r.mask.n_selected:,}",
                      *(f"{r.before[k]:.2f} → {r.after[k]:.2f}" for k in keys))
    console.print(table)
    if save:
        console.print(f"[green]edited model saved:[/] {data['saved']}")
    console.print(f"[green]results and figures:[/] {out}")


@memorization_app.command("unlearn")
def memorization_unlearn(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None, max_paragraphs: MaxOpt = 32,
    lr: LrOpt = 1e-5, steps: StepsOpt = 5, fraction: FracOpt = 0.001,
    weight_decay: WdOpt = 1.0, save: SaveOpt = None, allow_no_effect: AllowNoEffectOpt = False,
):
    """Unlearn memorized paragraphs (CO: keep − change): sparse vs random mask vs full FT."""
    _memorization_update("unlearn", model, corpus, out, as_json, device, prefix_len, suffix_len,
                         mp_min_em, nmp_max_em, limit, max_paragraphs, lr, steps, fraction,
                         weight_decay, save, allow_no_effect)


@memorization_app.command("edit")
def memorization_edit(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None, max_paragraphs: MaxOpt = 32,
    lr: LrOpt = 1e-5, steps: StepsOpt = 5, fraction: FracOpt = 0.001,
    weight_decay: WdOpt = 1.0, save: SaveOpt = None, allow_no_effect: AllowNoEffectOpt = False,
):
    """Edit memorized paragraphs towards their perturbed continuations (CO: keep + PMP NLL)."""
    _memorization_update("edit", model, corpus, out, as_json, device, prefix_len, suffix_len,
                         mp_min_em, nmp_max_em, limit, max_paragraphs, lr, steps, fraction,
                         weight_decay, save, allow_no_effect)


@memorization_app.command("all")
def memorization_all(
    model: ModelOpt = "organism:facts-neo", corpus: CorpusOpt = None,
    out: OutOpt = Path("memorization"), as_json: JsonOpt = False, device: DeviceOpt = None,
    prefix_len: PrefixOpt = 50, suffix_len: SuffixOpt = 50, mp_min_em: MpOpt = None,
    nmp_max_em: NmpOpt = 10, limit: LimitOpt = None, max_paragraphs: MaxOpt = 32,
    lr: LrOpt = 1e-2, steps: StepsOpt = 10, fraction: FracOpt = 0.001,
    weight_decay: WdOpt = 1.0,
):
    """Scan, perturb, attribute, heads, unlearn and edit in one run; writes summary.json.

    Defaults for the update (lr 1e-2, 10 steps) suit the small organisms; GPT-Neo 125M
    follows the paper with --lr 1e-5 --steps 5."""
    from memlens.memorization.pipeline import run_all

    handle, paragraphs, s = _memorization_inputs(
        model, corpus, prefix_len, suffix_len, limit, device, out, mp_min_em=mp_min_em,
        nmp_max_em=nmp_max_em, max_mp=max_paragraphs, max_nmp=max_paragraphs, lr=lr,
        steps=steps, fraction=fraction, weight_decay=weight_decay, progress=not as_json)
    summary = run_all(handle, paragraphs, out, s)
    if as_json:
        print_json(summary)
        return
    scan_summary = summary["scan"]
    console.print(f"[bold]memorization: {model}[/] — {scan_summary['n_mp']} MP, "
                  f"{scan_summary['n_nmp']} NMP of {scan_summary['n_paragraphs']}")
    for row in scan_summary["table"]:
        console.print(f"  repeats {row['repeats']}: {row['MP']} MP / {row['NMP']} NMP "
                      f"(mean EM {row['mean_em']})")
    head = summary["heads"]["candidate"]
    console.print(f"  candidate memorization head: layer {head['layer']} head {head['head']}")
    for mode in ("unlearn", "edit"):
        for method, r in summary[mode].items():
            console.print(f"  {mode} {method}: MP EM {r['before']['mp_em']:.1f} → "
                          f"{r['after']['mp_em']:.1f}, NMP EM {r['before']['nmp_em']:.1f} → "
                          f"{r['after']['nmp_em']:.1f}")
    console.print(f"[green]summary:[/] {out / 'summary.json'}")


# ── TopK language models (memlens.topk) ─────────────────────────────────────

topk_app = typer.Typer(help="Train TopK LMs, read their neurons, steer with them.",
                       no_args_is_help=True)
app.add_typer(topk_app, name="topk")

OrganismOpt = Annotated[str, typer.Option(
    "--organism", help="Organism (organism:NAME) or organism directory whose corpus, tokenizer "
    "and architecture the TopK model and its dense twin are trained on.")]
CorpusOpt = Annotated[str | None, typer.Option(
    "--corpus", help="Text file, organism:NAME or directory with corpus.txt (default: the "
    "model's own corpus.txt).")]


def _topk_train_config(steps: int, k: int | None, batch_size: int, lr: float,
                       n_last_nontopk: int, anneal_ratio: float, seed: int):
    from memlens.topk.train import TopKTrainConfig

    return TopKTrainConfig(steps=steps, k=k, batch_size=batch_size, lr=lr,
                           n_last_nontopk=n_last_nontopk, anneal_ratio=anneal_ratio, seed=seed)


StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps per model.")]
KOpt = Annotated[int | None, typer.Option("--k", help="Units kept per position (default d_ff/16).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Sequences per step.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
NLastOpt = Annotated[int, typer.Option("--n-last-nontopk", help="Final layers that stay dense.")]
AnnealOpt = Annotated[float, typer.Option("--anneal-ratio",
                                          help="Share of steps over which α goes 1 → 0.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Init and data-order seed (both models).")]


@topk_app.command("train")
def topk_train(
    organism: OrganismOpt = DEFAULT_MODEL,
    out: OutOpt = Path("topk-run"),
    steps: StepsOpt = 300,
    k: KOpt = None,
    batch_size: BatchOpt = 16,
    lr: LrOpt = 2e-3,
    n_last_nontopk: NLastOpt = 2,
    anneal_ratio: AnnealOpt = 0.2,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Train a TopK model and its dense twin alike; held-out perplexity, sparsity, dead units."""
    from memlens.topk.data import organism_corpus, text_blocks
    from memlens.topk.train import train_pair

    corpus = organism_corpus(organism)
    train_blocks, heldout = text_blocks(corpus.tokenizer, corpus.text)
    cfg = _topk_train_config(steps, k, batch_size, lr, n_last_nontopk, anneal_ratio, seed)
    pair = train_pair(corpus.config, corpus.tokenizer, train_blocks, heldout, cfg, out)
    result = pair.to_dict()
    (out / "pair.json").write_text(json.dumps(result, indent=1))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title=f"TopK vs dense twin ({organism}, {steps} steps)")
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
    corpus: CorpusOpt = None,
    out: OutOpt = Path("topk-neurons"),
    max_blocks: Annotated[int, typer.Option("--max-blocks", help="Text blocks to read.")] = 512,
    embedder: Annotated[str | None, typer.Option(
        "--embedder", help="sentence-transformers model for semantic entropy (default: the "
        "LM's input embeddings).")] = None,
    device: DeviceOpt = None,
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
        handle = load_model(ref, device=device)
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
    corpus: CorpusOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 20,
    out: OutOpt = Path("topk-steer"),
    device: DeviceOpt = None,
):
    """Add δ to one neuron while generating; concept-token frequency steered vs unsteered."""
    from memlens.model import load_model
    from memlens.topk.activation import TopKError
    from memlens.topk.data import neuron_blocks
    from memlens.topk.neurons import neuron_report
    from memlens.topk.steer import DEFAULT_PROMPTS, auto_neurons, parse_neuron, steer_report

    if not auto and neuron is None:
        raise TopKError("give --neuron LAYER:UNIT or --auto")
    handle = load_model(model, device=device)
    text = _neuron_text(corpus, model)
    blocks = neuron_blocks(handle.tokenizer, text, min(128, handle.max_length or 128))
    prompts = list(prompt or DEFAULT_PROMPTS)
    if auto:
        picks = [(n.layer, n.unit, n.token_ids,
                  [m * n.delta_scale for m in (delta or [0.5, 1.0, 2.0, 4.0])])
                 for n in auto_neurons(neuron_report(handle, blocks), n=n_auto)]
    else:
        layer, unit = parse_neuron(neuron)
        if not 0 <= layer < handle.n_layers:
            raise TopKError(f"layer {layer} does not exist (0 … {handle.n_layers - 1})")
        entry = neuron_report(handle, blocks, layers=[layer]).layer(layer)
        if not 0 <= unit < len(entry.top_token_ids):
            raise TopKError(f"unit {unit} does not exist (0 … {len(entry.top_token_ids) - 1})")
        picks = [(layer, unit, entry.top_token_ids[unit], list(delta or [10.0]))]
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


@topk_app.command("all")
def topk_all(
    organism: OrganismOpt = DEFAULT_MODEL,
    out: OutOpt = Path("topk-run"),
    steps: StepsOpt = 300,
    k: KOpt = None,
    batch_size: BatchOpt = 16,
    lr: LrOpt = 2e-3,
    n_last_nontopk: NLastOpt = 2,
    anneal_ratio: AnnealOpt = 0.2,
    seed: SeedOpt = 0,
):
    """Train TopK + dense twin, compare neuron entropies, steer auto-picked neurons; summary."""
    from memlens.topk.experiment import run_all

    cfg = _topk_train_config(steps, k, batch_size, lr, n_last_nontopk, anneal_ratio, seed)
    summary = run_all(organism, out, cfg)
    console.print((out / "summary.md").read_text())
    console.print(f"[bold]checks:[/] {summary['checks']}  → {out / 'summary.json'}")


# ── demo and report (memlens.report) ────────────────────────────────────────


@app.command()
def demo(
    out: OutOpt = Path("memlens-report"),
    model: ModelOpt = DEFAULT_MODEL,
    sections: Annotated[str | None, typer.Option(
        "--sections", help="Comma-separated subset of: organism, trace, rome, memit, "
        "memorization, topk.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Seconds-scale settings (smoke run).")]
    = False,
):
    """Run every capability on the default organism and write a self-contained HTML report."""
    from memlens.report.demo import DemoConfig, run_demo

    config = DemoConfig.quick(model) if quick else DemoConfig(model=model)
    if sections:
        config.sections = tuple(s.strip() for s in sections.split(",") if s.strip())
    index = run_demo(out, config)
    console.print(f"[bold green]report:[/] {index.resolve()}")
    console.print(f"[bold green]summary:[/] {(index.parent / 'summary.json').resolve()}")


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="A directory written by memlens demo.")],
    screenshot: Annotated[Path | None, typer.Option(
        "--screenshot", help="Also save a PNG of the report as headless Chromium renders it.")]
    = None,
    width: Annotated[int, typer.Option("--width", help="Screenshot width in pixels.")] = 1200,
    height: Annotated[int, typer.Option("--height", help="Screenshot height in pixels.")] = 1600,
):
    """Rebuild the HTML report and summary.json from saved results, without recomputing."""
    from memlens.report.html import build_report

    if not directory.is_dir():
        raise MemlensError(f"{directory} is not a directory of saved results")
    index = build_report(directory)
    console.print(f"[bold green]report:[/] {index}")
    if screenshot is not None:
        from memlens.report.browser import screenshot as take_screenshot

        take_screenshot(index, screenshot, width=width, height=height)
        console.print(f"[bold green]screenshot:[/] {screenshot}")


def main() -> None:
    """Console-script entry point: run the app, turning memlens errors (and file-system errors
    such as a full disk) into one-line messages and exit code 2. MEMLENS_DEBUG=1 re-raises
    them with their traceback."""
    try:
        from memlens.files import check_unicode

        for i, arg in enumerate(sys.argv[1:], start=1):
            check_unicode(arg, f"command-line argument {i}")
        app()
    except (MemlensError, OSError) as exc:
        if os.environ.get("MEMLENS_DEBUG") == "1":
            raise
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] "
                                                   f"{escape(_one_line(str(exc)))}")
        raise SystemExit(2) from None


def _one_line(message: str) -> str:
    """``message`` on one printable line: whitespace runs become one space; control and format
    characters (NUL, right-to-left overrides, zero-width spaces) and lone surrogates show as
    their escapes."""
    import unicodedata

    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch
                   for ch in " ".join(message.split()))
