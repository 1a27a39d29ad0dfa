"""``memlens probe``, ``knockout`` and ``lens``: where and how a fact is recalled
(:mod:`memlens.probe`, :mod:`memlens.knockout`, :mod:`memlens.lens`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    FactFileOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    RelationOpt,
    chosen_facts,
    console,
    fact_file,
    option,
    print_json,
    with_shared,
)
from memlens.errors import MemlensError

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

#: The options of knockout and lens: one fact, or the facts to average over.
FACT_OPTIONS = [
    option("model", ModelOpt, DEFAULT_MODEL), option("prompt", FactPromptOpt, None),
    option("subject", FactSubjectOpt, None), option("facts", FactsOpt, None),
    option("n", FactsNOpt, None), option("relation", RelationOpt, None),
]


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


def _one_fact_or_many(fact) -> Path | None:
    """None for one fact (--prompt and --subject), else the fact file to average over (on
    organisms, known_facts.json by default); one-line errors for inconsistent options."""
    if fact.prompt is not None or fact.subject is not None:
        if fact.prompt is None or fact.subject is None:
            raise MemlensError("give --prompt and --subject together (one fact), or --facts")
        if fact.facts is not None:
            raise MemlensError("give either one fact (--prompt, --subject) or --facts, not both")
        return None
    return fact_file(fact.model, fact.facts, "give --prompt and --subject, or --facts (a "
                     "default fact file exists only for --model organism:NAME)")


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
    dtype: DtypeOpt = None,
):
    """P-probing: held-out accuracy of linear probes of the fact's object, per token group and
    layer, with a shuffled-label control and the chance level."""
    from memlens.model import load_model
    from memlens.probe import GROUP_LABELS, layer_label, parse_probe_layers, plot_probe, probe_facts
    from memlens.trace import load_facts

    chosen = load_facts(fact_file(model, facts))
    handle = load_model(model, device=device, dtype=dtype)
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


@with_shared(FACT_OPTIONS)
def knockout(
    fact,
    window: Annotated[int | None, typer.Option("--window", help="Layers blocked together (default: "
                                               "Geva et al.'s 9 of 48, scaled to the model's "
                                               "depth).")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Token to score for one fact "
                                               "(default: the model's prediction).")] = None,
    out: OutOpt = Path("memlens-knockout"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
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

    facts_path = _one_fact_or_many(fact)
    if facts_path is None:
        handle = load_model(fact.model, device=device, dtype=dtype)
        result = knockout_fact(handle, fact.prompt, fact.subject, window=window, answer=answer)
        name = "knockout"
        headline = (f"[bold]{fact.prompt}[/] → {result.answer!r}: p_clean {result.p_clean:.3f}; "
                    f"blocked {result.window} layer(s) at a time")
    else:
        if answer is not None:
            raise MemlensError("--answer applies to one fact (--prompt); facts are scored on "
                               "the model's prediction")
        handle = load_model(fact.model, device=device, dtype=dtype)
        chosen = chosen_facts(facts_path, fact.n, fact.relation)
        result = average_knockout(handle, chosen, window=window, progress=not as_json,
                                  resume=knockout_cache(handle))
        name = "knockout_avg"
        headline = (f"{_fact_counts(result)}; mean p_clean {result.p_clean:.3f}; "
                    f"blocked {result.window} layer(s) at a time")
    data = result.to_json()
    saved = _save_results(out, name, data, plot_knockout(result))
    if as_json:
        print_json(data)
        return
    import math

    console.print(headline)
    table = _layer_table("% change in p(answer) when the last token cannot attend to …",
                         "source \\ layer", handle.n_layers)
    for source, curve in result.relative.items():
        table.add_row(SOURCE_LABELS[source], *("–" if math.isnan(v) else f"{100 * v:+.0f}"
                                               for v in curve))
    console.print(table)
    console.print(saved)


@with_shared(FACT_OPTIONS)
def lens(
    fact,
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
    dtype: DtypeOpt = None,
):
    """Logit lens and attribute rate (Geva et al. 2023): the share of each layer's top tokens
    (residual stream, MLP and attention outputs, through the final norm and unembedding) that
    are attributes of the subject. One fact (--prompt, --subject) or the mean over --facts."""
    from memlens.lens import KIND_LABELS, load_attributes
    from memlens.model import load_model

    facts_path = _one_fact_or_many(fact)
    attributes = _attribute_file(fact.model, attributes, facts_path)
    known = load_attributes(attributes)
    kinds = [k_.strip() for k_ in kind.split(",") if k_.strip()]
    handle = load_model(fact.model, device=device, dtype=dtype)
    if facts_path is None:
        run = _lens_one(handle, fact.prompt, fact.subject, known, attributes, k, kinds)
    else:
        chosen = chosen_facts(facts_path, fact.n, fact.relation)
        run = _lens_many(handle, chosen, known, k, kinds, as_json)
    result, name, data, figure, curves, headline = run
    saved = _save_results(out, name, data, figure)
    if as_json:
        print_json(data)
        return
    console.print(headline)
    table = _layer_table(f"attribute rate at the last subject token (top {result.k}; chance "
                         f"{result.chance:.3f})", "kind \\ layer", handle.n_layers)
    for kind_, curve in curves.items():
        table.add_row(KIND_LABELS[kind_], *(f"{v:.2f}" for v in curve))
    console.print(table)
    if facts_path is not None:
        peaks = ", ".join(f"{KIND_LABELS[kind_]} {v['rate']:.3f} @ layer {v['layer']}"
                          for kind_, v in result.peak("last").items())
        console.print(f"  highest rate at the last token: {peaks}")
    elif "residual" in result.top:
        layer = int(curves["residual"].argmax())
        last = result.subject_range[1] - 1
        words = result.top_at("residual", last, layer, handle.tokenizer)
        console.print(f"  residual top tokens at the last subject token, layer {layer}: "
                      f"{', '.join(repr(w) for w in words)}")
    console.print(saved)


def _attribute_file(model: str, attributes: Path | None, facts_path: Path | None) -> Path:
    """--attributes, else the organism's facts.json, else the --facts file."""
    if attributes is not None:
        return attributes
    from memlens.model import organism_file, organism_name

    if organism_name(model) is not None:
        return organism_file(model, "facts.json")
    if facts_path is not None:
        return facts_path
    raise MemlensError("give --attributes FILE (JSON {subject: [attributes]}): the lens "
                       "needs the subject's attributes")


def _lens_one(handle, prompt: str, subject: str, known: dict, attributes: Path,
              k: int | None, kinds: list[str]):
    """The lens of one fact: (result, file name, JSON, figure, curves, headline)."""
    from memlens.lens import lens_fact, plot_lens

    if not known.get(subject):
        raise MemlensError(f"{attributes} lists no attributes for subject {subject!r}")
    result = lens_fact(handle, prompt, subject, known[subject], k=k, kinds=kinds)
    last = result.subject_range[1] - 1
    curves = {kind_: result.rate[kind_][last] for kind_ in result.rate}
    headline = f"[bold]{prompt}[/]: attributes of {subject!r}: {', '.join(result.attributes)}"
    return (result, "lens", result.to_json(handle.tokenizer), plot_lens(result), curves,
            headline)


def _lens_many(handle, chosen: list, known: dict, k: int | None, kinds: list[str],
               as_json: bool):
    """The mean lens over facts: (result, file name, JSON, figure, curves, headline)."""
    from memlens.lens import average_lens, plot_average_lens

    result = average_lens(handle, chosen, known, k=k, kinds=kinds, progress=not as_json)
    curves = {kind_: result.at(kind_) for kind_ in result.kinds}
    return (result, "lens_avg", result.to_json(), plot_average_lens(result), curves,
            _fact_counts(result))


def register(app: typer.Typer) -> None:
    app.command()(probe)
    app.command()(knockout)
    app.command()(lens)
