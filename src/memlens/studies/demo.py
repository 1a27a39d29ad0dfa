"""The demo's experiments: the whole story on the default organism, one section at a time.

    run_sections(Path("memlens-report"), DemoConfig())           # every section's results
    run_sections(out, DemoConfig.quick("organism:tiny"))          # seconds-scale settings (tests)

Each section calls the same API as its CLI command (printed in the report beside its numbers),
saves its results and figures in ``out/<section>/`` with a ``section.json``
(:mod:`memlens.studies.section`), and a failure in one section is recorded (status "failed",
with the error) without stopping the others. :func:`memlens.report.demo.run_demo` runs them and
renders the HTML page; ``memlens report out`` rebuilds the page without recomputing.
A number a section cannot compute is written as ``{"value": None, "reason": ...}``
(:mod:`memlens.missing`), never as NaN or a bare None.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from memlens.missing import explain, format_value, missing
from memlens.model import organism_file, organism_name
from memlens.studies.section import Section, Table

console = Console()


@dataclass
class DemoConfig:
    """What the demo runs and how big each step is. The defaults keep a run on cached
    organisms near 5 minutes on 2 CPU cores; the README's headline numbers come from the
    full commands each section prints (e.g. ``memlens bench-edits --sizes 1,10,100,1000``)."""

    model: str = "organism:facts-gpt2"
    memorization_model: str | None = None  # default: ``model``
    sections: tuple[str, ...] = ("organism", "trace", "recall", "rome", "memit", "sequential",
                                 "memorization", "topk")
    trace_samples: int = 10
    trace_avg_facts: int = 100
    recall_facts: int = 50  # facts averaged by the knockout and the attribute lens
    rome_cases: int = 10
    memit_sizes: tuple[int, ...] = (1, 5, 15)
    memit_ge_cases: int = 5  # cases whose generations give GE at each point
    sequential_batch: int = 10  # edits per round of sequential MEMIT / AlphaEdit
    sequential_rounds: int = 3
    sequential_unrelated: int = 50  # held-out cases whose known facts measure "unrelated"
    memorization_paragraphs: int | None = None  # None: all of the organism's paragraphs
    memorization_max: int = 8  # MP and NMP paragraphs used by perturb / attribute / updates
    # Sparse updates: the reference's lr 1e-5 × 5 steps (GPT-Neo 125M) leaves the organisms'
    # memorized paragraphs untouched (MP EM 50 → 50 on facts-gpt2); tiny needs lr 0.1 × 10.
    memorization_lr: float = 0.1
    memorization_steps: int = 10
    topk_steps: int = 200  # `memlens topk all` (the README's numbers) trains 300
    topk_auto: int = 4
    topk_neuron_blocks: int = 512  # held-out blocks the neuron entropies are measured on
    topk_eval_limit: int = 100  # items per task of `memlens topk eval` on the pair (0: none)
    topk_rome_cases: int = 10  # CounterFact cases ROME edits on the TopK twin and the organism
    generation_tokens: int = 20

    @classmethod
    def quick(cls, model: str) -> DemoConfig:
        """Seconds-scale settings for tests and smoke runs."""
        return cls(model=model, trace_samples=3, trace_avg_facts=4, recall_facts=4, rome_cases=2,
                   memit_sizes=(2,), sequential_batch=2, sequential_rounds=2,
                   sequential_unrelated=8, memorization_paragraphs=8, memorization_max=2,
                   topk_steps=20, topk_auto=1, topk_neuron_blocks=16, topk_eval_limit=10,
                   topk_rome_cases=2, generation_tokens=8)


def run_sections(out: Path, config: DemoConfig) -> None:
    """Run the configured sections on ``config.model``; save each in ``out/<key>/``."""
    from memlens.model import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console.rule(f"memlens demo on {config.model}")
    handle = load_model(config.model)
    found: dict[str, Any] = {}  # what a section finds for later ones (the trace's recall site)
    for order, key in enumerate(config.sections):
        if key not in SECTIONS:
            raise KeyError(f"unknown demo section {key!r}; known: {', '.join(SECTIONS)}")
        title, step = SECTIONS[key]
        console.rule(f"[bold]{title}")
        directory = out / key
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            section = step(handle, directory, config, found)
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
            console.print(f"[bold red]{title} failed:[/] {exc}")
            section = Section(key=key, title=title, command="", model=config.model,
                              status="failed", text=f"{type(exc).__name__}: {exc}\n\n"
                              + traceback.format_exc(limit=3))
        section.key, section.title, section.order = key, title, order
        section.seconds = round(time.perf_counter() - start, 1)
        section.save(directory)
        console.print(f"{title}: {section.status} in {section.seconds:.0f} s")


def _layer_source(found: dict) -> str:
    if "edit_layers" in found:
        return ("the demo's averaged causal trace: MLP effect at the last subject token, "
                "layers ≥ ½ of its peak")
    return "the editor's default (a causal trace of the request)"


def _figures(directory: Path, names: list[Path] | list[str]) -> list[str]:
    """PNG figure names relative to ``directory`` (SVGs stay on disk for papers)."""
    return [Path(name).name for name in names if str(name).endswith(".png")]


def _organism(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.studies.organism_report import cached_evaluation

    if handle.source_dir is None or not (handle.source_dir / "organism.json").exists():
        return Section(key="", title="", command="", model=config.model, status="skipped",
                       text="The model is not a memlens organism.")
    report = cached_evaluation(handle.source_dir, handle.fingerprint())
    (directory / "organism_eval.json").write_text(json.dumps(report, indent=1))
    memorized = report["memorized_fraction_by_repeats"]
    return Section(
        key="", title="", model=config.model,
        command=f"memlens organism eval {organism_name(config.model) or config.model} --json",
        summary={k: report[k] for k in ("fact_accuracy", "heldout_template_accuracy",
                                        "paraphrase_accuracy", "n_facts", "n_params",
                                        "train_seconds") if k in report},
        tables=[Table("Memorized paragraphs (EM 50/50) by number of repeats",
                      ["repeats", "memorized fraction", "mean EM"],
                      [[r, memorized[r], report["mean_em_by_repeats"][r]] for r in memorized])],
        text="The organism memlens trained itself: first-token accuracy on its facts (training "
             "templates), on held-out templates and on the CounterFact paraphrase prompts; "
             "paragraphs are memorized only when repeated often.",
    )


def _trace(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.edit.hparams import ROMEHyperParams
    from memlens.edit.layers import band_around_peak
    from memlens.edit.memit import MEMITHyperParams
    from memlens.trace import average_trace, load_facts, select_facts, trace_cache, trace_fact
    from memlens.trace.plot import plot_average, plot_trace

    facts = load_facts(organism_file(config.model, "known_facts.json"))
    fact = facts[0]
    single = trace_fact(handle, fact["prompt"], fact["subject"], samples=config.trace_samples)
    single.save(directory / "trace.json")
    figures = plot_trace(single, directory, model_name=config.model)
    chosen = select_facts(facts, config.trace_avg_facts)
    avg = average_trace(handle, chosen, samples=config.trace_samples, progress=True,
                        resume=trace_cache(handle))
    (directory / "trace_avg.json").write_text(json.dumps(avg.to_json(), indent=1))
    figures += plot_average(avg, directory)
    site = avg.recall_site()
    band = band_around_peak(avg.effect("mlp", "last_subject"))
    if band is not None:  # the editing sections edit where this organism recalls
        curve = avg.effect("mlp", "last_subject")
        # MEMIT's and ROME's own defaults for this model (organisms: layer 0) when they lie
        # in the band, else the band (MEMIT) and the band's strongest MLP (ROME)
        memit_default = MEMITHyperParams.for_model(handle).layers
        found["edit_layers"] = list(memit_default) if memit_default and \
            set(memit_default) <= set(band) else band
        # ROME's own default for this model (organisms: layer 0) when it has one, else the
        # band's strongest MLP (on facts-gpt2 MLPs 0 and 1 tie; layer 0 edits best)
        default = ROMEHyperParams.for_model(handle).layer
        found["edit_layer"] = default if default in band else max(band, key=lambda i: curve[i])
    rows = [[kind, *(site[place][kind][key] for place in ("aie_last_subject_token",
                                                          "aie_last_token")
                     for key in ("max", "layer"))]
            for kind in site["aie_last_subject_token"]]
    return Section(
        key="", title="", model=config.model,
        command=f'memlens trace --model {config.model} --prompt "{fact["prompt"]}" '
                f'--subject "{fact["subject"]}" --kind all; memlens trace-avg --model '
                f"{config.model} --n {config.trace_avg_facts}",
        hparams={"samples": config.trace_samples, "noise": single.noise, "window": single.window},
        summary={"prompt": fact["prompt"], "answer": single.answer, "p_clean": single.p_clean,
                 "p_corrupted": single.p_corrupted, "facts_traced": avg.n_facts,
                 "facts_skipped_wrong": avg.n_skipped_wrong, "ATE": site["te"]},
        tables=[Table("Recall site: max AIE over layers", ["kind", "last subject token",
                      "layer", "last token", "layer"], rows)],
        figures=_figures(directory, figures),
        text="Causal tracing (ROME §2): the subject's embeddings are corrupted with Gaussian "
             "noise, then the clean state of one (token, layer) is restored; the heatmaps show "
             "the probability of the correct answer after each restoration. The average over "
             "known facts groups tokens as in the paper.",
    )


def _recall(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.figures import save_figure
    from memlens.knockout import average_knockout, knockout_cache, plot_knockout
    from memlens.lens import average_lens, load_attributes, plot_average_lens
    from memlens.trace import load_facts, select_facts

    facts = select_facts(load_facts(organism_file(config.model, "known_facts.json")),
                         config.recall_facts)
    knockout = average_knockout(handle, facts, resume=knockout_cache(handle))
    (directory / "knockout_avg.json").write_text(json.dumps(knockout.to_json(), indent=1))
    save_figure(plot_knockout(knockout), directory / "knockout.png", dpi=150)
    attributes = load_attributes(organism_file(config.model, "facts.json"))
    lens = average_lens(handle, facts, attributes)
    (directory / "lens_avg.json").write_text(json.dumps(lens.to_json(), indent=1))
    save_figure(plot_average_lens(lens), directory / "lens.png", dpi=150)
    blocked = [[source, s["layer"], format_value(100 * s["relative"]) + " %"]
               for source, s in knockout.strongest().items()]
    peaks = [[kind, p["layer"], format_value(p["rate"])] for kind, p in lens.peak().items()]
    n = config.recall_facts
    return Section(
        key="", title="", model=config.model,
        command=f"memlens knockout --model {config.model} --n {n} --out {directory}; "
                f"memlens lens --model {config.model} --n {n} --out {directory}",
        hparams={"facts": n, "window": knockout.window, "lens_top_k": lens.k},
        summary={"knockout_facts": knockout.n_facts, "lens_facts": lens.n_facts,
                 "attribute_rate_chance": lens.chance},
        tables=[Table(f"Attention knockout (window {knockout.window}): where blocking the "
                      "last position's attention to each set hurts P(answer) most",
                      ["last position cannot attend to", "window centre", "change"], blocked),
                Table("Attribute lens at the last subject token: highest share of top tokens "
                      "that are the subject's attributes", ["output", "layer", "rate"], peaks)],
        figures=["knockout.png", "lens.png"],
        text="How the organism recalls (Geva et al. 2023): cutting the last position's "
             "attention to the subject shows the layers where the attribute is read out of the "
             "subject; the logit lens shows how much of each layer's state at the subject "
             "already names the subject's attributes (subject enrichment).",
    )


def _rome(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.edit import apply_rome
    from memlens.evaluate import ReferenceTexts, evaluate_counterfact, load_counterfact

    data = organism_file(config.model, "counterfact.json")
    cases = load_counterfact(data, n=config.rome_cases)
    case = cases[0]
    request = case.request
    prompts = [request.prompt.format(request.subject)] + list(case.paraphrase_prompts[:1]) \
        + list(case.neighborhood_prompts[:1])
    before = _generate(handle, prompts, config.generation_tokens)
    edit = apply_rome(handle, request, layer=found.get("edit_layer"))
    after = _generate(handle, prompts, config.generation_tokens)
    layer = edit.layer
    edit.undo()
    references = ReferenceTexts.for_data(handle, data)  # as `memlens eval counterfact`
    result = evaluate_counterfact(handle, cases, editor="rome", layer=layer,
                                  references=references, progress=True)
    (directory / "counterfact.json").write_text(json.dumps(result.to_dict(), indent=1,
                                                           default=str))
    rows = [[metric, values["pre"], values["post"]] for metric, values in result.summary.items()
            if isinstance(values, dict)]
    return Section(
        key="", title="", model=config.model,
        command=f"memlens edit rome --model {config.model} --request req.json --layer {layer}; "
                f"memlens eval counterfact --model {config.model} --edit rome --layer {layer} "
                f"--n {config.rome_cases}",
        hparams={"layer": layer, "layer_source": _layer_source(found),
                 "request": {"prompt": request.prompt, "subject":
                                             request.subject, "target_new": request.target_new}},
        summary={"edited_layer": layer, "cases": len(cases),
                 "references": result.extra["references"] or missing(
                     "no reference_texts.json or corpus.txt beside the data or the model")},
        tables=[Table(f"Generations before / after {request.subject}: {request.target_true} → "
                      f"{request.target_new}", ["prompt", "before", "after"],
                      [[p, b, a] for p, b, a in zip(prompts, before, after, strict=True)]),
                Table("CounterFact, one ROME edit at a time (undone between)",
                      ["metric", "pre", "post"], rows)],
        text="ROME (§3) writes one new fact into one MLP matrix with a rank-one update; "
             "ES/PS/NS compare P(new) with P(true) on the rewrite, paraphrase and neighbourhood "
             "prompts before and after each edit.",
    )


def _memit(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.evaluate import load_counterfact
    from memlens.studies.scaling import bench_edits, plot_scaling

    cases = load_counterfact(organism_file(config.model, "counterfact.json"))
    result = bench_edits(handle, cases, config.memit_sizes, ge_cases=config.memit_ge_cases,
                         layers=found.get("edit_layers"), layer=found.get("edit_layer"),
                         out_dir=directory, progress=True)
    figure = plot_scaling(result, directory / "scaling.png")
    (directory / "scaling.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    rows = []
    for r in result.table():
        rows.append([r["method"], r["n"], r["ES"], r["PS"], r["NS"], r["Score"], r["GE"],
                     r["seconds"]])
    return Section(
        key="", title="", model=config.model,
        command=f"memlens bench-edits --model {config.model} --sizes "
                + ",".join(map(str, config.memit_sizes)) + f" --ge-cases {config.memit_ge_cases}"
                + (f" --layers {found['edit_layers'][0]}-{found['edit_layers'][-1]}"
                   f" --layer {found['edit_layer']}" if "edit_layers" in found else ""),
        hparams={"sizes": list(config.memit_sizes), "ge_cases": config.memit_ge_cases,
                 "editors": {name: {**{k: v for k, v in setup.items() if k != "hparams"},
                                    **({"layer_source": _layer_source(found)}
                                       if "edit_layers" in found else {})}
                             for name, setup in result.settings["editors"].items()}},
        tables=[Table("Edits at once: MEMIT vs sequential ROME vs FT-L",
                      ["method", "edits", "ES", "PS", "NS", "Score", "GE", "seconds"], rows)],
        figures=[Path(figure).name],
        text="MEMIT spreads many edits over a band of MLP layers in one batch; ROME applied "
             "one after another and constrained fine-tuning (FT-L) are the baselines.",
    )


def _sequential(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.evaluate import load_counterfact
    from memlens.studies.sequential import METRICS, sequential_edits

    cases = load_counterfact(organism_file(config.model, "counterfact.json"))
    result = sequential_edits(handle, cases, batch_size=config.sequential_batch,
                              rounds=config.sequential_rounds, methods=("memit", "alphaedit"),
                              layers=found.get("edit_layers"), unrelated=config.sequential_unrelated,
                              out_dir=directory, progress=True)
    shown = [m for m in METRICS if m != "GE"]  # GE needs generations; the demo skips them
    rows = [[p.method, p.round, p.n_edits, *(getattr(p, m) for m in shown), p.seconds]
            for p in result.points]
    last = {p.method: p for p in result.points if p.round == config.sequential_rounds}
    band = (f" --layers {found['edit_layers'][0]}-{found['edit_layers'][-1]}"
            if "edit_layers" in found else "")
    return Section(
        key="", title="", model=config.model,
        command=f"memlens bench-edits --model {config.model} --sequential --methods "
                f"memit,alphaedit --batch-size {config.sequential_batch} --rounds "
                f"{config.sequential_rounds} --unrelated {config.sequential_unrelated}"
                f" --ge-cases 0{band}",
        hparams={"batch_size": config.sequential_batch, "rounds": config.sequential_rounds,
                 "unrelated_known": result.settings["unrelated_known"],
                 "editors": {name: {k: v for k, v in setup.items() if k != "hparams"}
                             for name, setup in result.settings["editors"].items()}},
        summary={f"{method}_{metric}": getattr(point, metric)
                 for method, point in last.items() for metric in ("ES", "NS", "unrelated")},
        tables=[Table("Rounds of edits on one model (ES/PS/NS on every edit so far)",
                      ["method", "round", "edits", *shown, "seconds"], rows)],
        figures=["sequential.png"],
        text="Batches of edits applied one after another to one model, as in the AlphaEdit "
             "paper's Table 1: after each round ES/PS/NS are measured on all edits so far and "
             "'unrelated' is the fraction of held-out facts the model still answers. AlphaEdit "
             "projects each MEMIT update onto the null space of the preserved keys, so that "
             "later rounds disturb earlier edits and unrelated facts less; docs/alphaedit.md "
             "follows both over 1,300 edits.",
    )


def _memorization(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.memorization import load_paragraphs
    from memlens.model import load_model
    from memlens.studies.memorization import Settings, run_all

    model = config.memorization_model or config.model
    target = load_model(model, attn_implementation="eager")
    paragraphs = load_paragraphs(target)
    if config.memorization_paragraphs:
        paragraphs = paragraphs[: config.memorization_paragraphs]
    settings = Settings(max_mp=config.memorization_max, max_nmp=config.memorization_max,
                        lr=config.memorization_lr, steps=config.memorization_steps)
    summary = run_all(target, paragraphs, directory, settings)
    rows = []
    scan = summary["scan"]
    for mode in ("unlearn", "edit"):
        for method, values in summary[mode].items():
            rows.append([mode, method, values["n_weights"], _fmt(values["before"], scan),
                         _fmt(values["after"], scan)])
    heads = summary["heads"]
    return Section(
        key="", title="", model=model,
        command=f"memlens memorization all --model {model} --lr {config.memorization_lr} "
                f"--steps {config.memorization_steps} --out {directory}",
        hparams=summary["settings"],
        summary={"scan": summary["scan"], "candidate_head": heads.get("candidate")},
        tables=[Table("Sparse unlearning and editing (before → after)",
                      ["objective", "mask", "weights", "before", "after"], rows)],
        figures=sorted(p.name for p in directory.glob("*.png")),
        text="Paragraphs repeated in training are decoded greedily from a 50-token prefix; "
             "exact match (EM) and suffix NLL separate memorized (MP) from non-memorized (NMP) "
             "paragraphs. Gradients locate them; updating only the top 0.1% of weights by the "
             "contrastive objective's gradient unlearns MP while NMP stays.",
    )


def _fmt(values: dict[str, Any], scan: dict[str, Any]) -> str:
    """``key value, ...`` of one before/after measurement (3 significant digits); a mean over
    no paragraph (NaN) as ``n/a (reason)``."""
    return ", ".join(f"{k} {format_value(explain(v, _no_paragraphs(k, scan)), 3)}"
                     for k, v in values.items())


def _no_paragraphs(key: str, scan: dict[str, Any]) -> str:
    """Why the measurement ``key`` (``mp_em``, ``nmp_nll``, ``target_em``, ...) has no value."""
    kind = "non-memorized (NMP)" if key.startswith("nmp_") else "memorized (MP)" \
        if key.startswith(("mp_", "target_")) else None
    if kind is None:
        return f"{key} came out NaN"
    return f"the scan found no {kind} paragraph among {scan.get('n_paragraphs', '?')}"


def _topk(handle, directory: Path, config: DemoConfig, found: dict) -> Section:
    from memlens.studies.organism_tasks import pair_table
    from memlens.studies.topk import run_all, shared_models_dir
    from memlens.topk import TopKTrainConfig

    cfg = TopKTrainConfig(steps=config.topk_steps)
    models = shared_models_dir(config.model, cfg)
    summary = run_all(config.model, directory, cfg, n_auto=config.topk_auto,
                      n_neuron_blocks=config.topk_neuron_blocks,
                      max_new_tokens=config.generation_tokens, models=models)
    limit = config.topk_eval_limit
    header, rows, evaluated = pair_table(models, config.model, directory, limit) if limit \
        else ([], [], {})
    markdown = (directory / "summary.md").read_text() if (directory / "summary.md").exists() \
        else ""
    rome_tables, rome_summary, rome_command = _topk_twin_rome(config, directory)
    return Section(
        key="", title="", model=config.model,
        command=f"memlens topk all --organism {config.model} --steps {config.topk_steps} "
                f"--out {directory}" + (f"; memlens topk eval --model {models}/topk --twin "
                                        f"{models}/dense --organism {config.model} --limit "
                                        f"{limit} --bootstrap-iters 1000 --out {directory}"
                                        if limit else "") + rome_command,
        hparams=asdict(cfg),
        summary={**{k: v for k, v in summary.items() if isinstance(v, str | int | float)},
                 "best_steering_ratio": explain(
                     (summary["best_steering"] or {}).get("ratio"),
                     f"no neuron was steered: {config.topk_auto} asked, none picked"),
                 **evaluated, **rome_summary},
        tables=([Table(f"TopK vs dense on lm-evaluation-harness (first {limit} items per task; "
                       "± one standard error, gap paired over items)", header, rows)]
                if rows else []) + rome_tables,
        figures=sorted(p.name for p in directory.glob("*.png")),
        text="A TopK LM (only k MLP units active per token) and its dense twin trained on the "
             "same data and budget; neurons of the TopK model have lower token entropy, and "
             "adding δ to one of them steers generation toward its concept.\n\n" + markdown,
    )


def _topk_twin_rome(config: DemoConfig, directory: Path) -> tuple[list[Table], dict, str]:
    """ROME on the TopK model trained like the organism and on the organism itself (its dense
    twin): the same first ``topk_rome_cases`` CounterFact cases, each edited alone; and how
    many units ROME's key activates in each. Tables, summary entries, the command."""
    from memlens.studies.topk import organism_twin
    from memlens.studies.topk_edit import EFFICACY_METRICS, compare_rome_keys, efficacy_rows
    from memlens.topk_mlp import TopKError

    n = config.topk_rome_cases
    if not n:
        return [], {}, ""
    try:
        twin = organism_twin(config.model)
    except TopKError as exc:
        return [], {"topk_twin_rome_ES": explain(None, str(exc))}, ""
    results = compare_rome_keys(str(twin), config.model, config.model, n=n,
                                out=directory / "rome_keys", efficacy=True)
    keys = [[name, f"{s['key_nonzero_mean']:.1f}", f"{s['key_units_90_mean']:.1f}",
             f"{s['u_mass_on_key_mean']:.3f}"]
            for name, s in ((name, results[name]["summary"]) for name in ("topk", "dense"))]
    layer = results["topk"]["summary"]["layer"]
    tables = [
        Table(f"ROME on the TopK model trained like the organism (topk) and on the organism "
              f"(dense): first {n} CounterFact cases, each edited alone, pre → post",
              ["model", *EFFICACY_METRICS], efficacy_rows(results)),
        Table(f"ROME's key k at layer {layer} (mean over the cases)",
              ["model", "non-zeros of k", "units for 90% of ‖k‖²", "‖u‖² on k's units"], keys),
    ]
    summary = {"topk_twin_rome_ES": results["topk"]["counterfact"]["ES"]["post"],
               "organism_rome_ES": results["dense"]["counterfact"]["ES"]["post"]}
    command = (f"; memlens topk rome-keys --model {twin} --twin {config.model} --organism "
               f"{config.model} --n {n} --efficacy --out {directory / 'rome_keys'}")
    return tables, summary, command


def _generate(handle, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (one at a time: no padding effects)."""
    import torch

    texts = []
    for prompt in prompts:
        ids = handle.encode([prompt]).input_ids
        with torch.no_grad():
            out = handle.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=handle.tokenizer.pad_token_id)
        texts.append(handle.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


SECTIONS: dict[str, tuple[str, Callable[..., Section]]] = {
    "organism": ("The model organism", _organism),
    "trace": ("Causal tracing", _trace),
    "recall": ("How the organism recalls a fact", _recall),
    "rome": ("ROME: one edit, evaluated", _rome),
    "memit": ("MEMIT: many edits at once", _memit),
    "sequential": ("Sequential editing: MEMIT vs AlphaEdit", _sequential),
    "memorization": ("Paragraph memorization", _memorization),
    "topk": ("TopK language model", _topk),
}

__all__ = ["SECTIONS", "DemoConfig", "run_sections"]
