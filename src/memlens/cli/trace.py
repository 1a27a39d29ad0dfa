"""``memlens trace`` and ``memlens trace-avg``: causal tracing (:mod:`memlens.trace`)."""

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
    TraceWindowOpt,
    chosen_facts,
    console,
    fact_file,
    print_json,
)
from memlens.errors import MemlensError

SamplesOpt = Annotated[int, typer.Option("--samples", help="Noise samples S.")]


def trace(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The fact's prompt, e.g. "
                                        "'Toulouse is a city in'.")],
    subject: Annotated[str, typer.Option("--subject", "-s", help="Subject; must occur in the "
                                         "prompt.")],
    model: ModelOpt = DEFAULT_MODEL,
    kind: Annotated[str, typer.Option("--kind", help="hidden, mlp, attn, severed_mlp, "
                                      "severed_attn, severed (hidden + both severed) or all.")]
    = "all",
    samples: SamplesOpt = 10,
    noise: Annotated[str | None, typer.Option("--noise", help="ν (a number), 'uniform' or "
                                              "'uniform:X'; default 3 × std of subject "
                                              "embeddings.")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Token to score (default: "
                                               "the model's prediction).")] = None,
    window: TraceWindowOpt = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: OutOpt = Path("memlens-trace"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Causal trace of one fact: heatmaps of P(answer) after restoring each (token, layer)."""
    from memlens.model import load_model
    from memlens.trace import trace_fact
    from memlens.trace.plot import plot_trace

    kinds = ("hidden", "severed_mlp", "severed_attn") if kind == "severed" else (kind,)
    handle = load_model(model, device=device, dtype=dtype)
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


def trace_avg(
    model: ModelOpt = DEFAULT_MODEL,
    facts: FactFileOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Trace N facts spread evenly over the "
                                          "file (all relations keep their share).")] = None,
    relation: RelationOpt = None,
    kind: Annotated[str, typer.Option("--kind", help="Comma-separated kinds or 'all'.")]
    = "all",
    samples: SamplesOpt = 10,
    noise: Annotated[str | None, typer.Option("--noise", help="ν, 'uniform' or 'uniform:X'.")]
    = None,
    window: TraceWindowOpt = None,
    out: OutOpt = Path("memlens-trace-avg"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
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

    facts = fact_file(model, facts)
    handle = load_model(model, device=device, dtype=dtype)
    chosen = chosen_facts(facts, n, relation)
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


def register(app: typer.Typer) -> None:
    app.command()(trace)
    app.command("trace-avg")(trace_avg)
