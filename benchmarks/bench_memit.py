"""MEMIT's z for many edits: optimised in one batch vs one fact after another (the reference).

    python -m benchmarks.bench_memit            # 1,000 edits; writes ## memit in RESULTS.md
    python -m benchmarks.bench_memit --n 100    # quicker

Model: organism:facts-gpt2 if it is already built, else the `tiny` organism (built if needed).
Requests are the organism's CounterFact cases (cycled to reach n). Both runs optimise the same
objective from the same start with the same seeds; the loop calls the optimiser once per fact.
Peak memory: the process's peak RSS (resource.getrusage) after each run.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def pick_model() -> str:
    from memlens.organisms.registry import ensure, is_built, organism_dir

    if is_built(organism_dir("facts-gpt2")):
        return str(organism_dir("facts-gpt2"))
    return str(ensure("tiny", progress=True))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(n: int, layer: int | None, write: bool, model: str | None = None) -> dict:
    from memlens.edit.context import context_templates
    from memlens.edit.keys import fact_token_reads
    from memlens.edit.memit import MEMITHyperParams, middle_band
    from memlens.edit.optimize import DeltaObjective, optimize_deltas
    from memlens.edit.requests import answer_ids
    from memlens.evaluate import load_counterfact
    from memlens.model import load_model

    torch.set_num_threads(1)
    path = model or pick_model()
    handle = load_model(path, device="cpu")
    cases = load_counterfact(Path(path) / "counterfact.json")
    requests = [cases[i % len(cases)].request for i in range(n)]
    targets = [answer_ids(handle.tokenizer, r.text, r.target_new) for r in requests]
    hp = MEMITHyperParams.for_model(handle)
    top = layer if layer is not None else middle_band(handle.n_layers)[-1]
    point = f"blocks.{top}.hook_resid_post"
    templates = context_templates(handle, hp.context_templates, seed=hp.context_seed)
    objective = DeltaObjective.from_hparams(hp)
    h0 = fact_token_reads(handle, requests, ["{}"], hp.fact_token, {point: "bare"})[point]

    started = time.perf_counter()
    batched = optimize_deltas(handle, point, requests, targets, templates, h0, objective,
                              max_batch_tokens=hp.max_batch_tokens, progress=True)
    t_batched = time.perf_counter() - started
    rss_batched = peak_rss_mb()

    started = time.perf_counter()
    alone = [optimize_deltas(handle, point, [r], [t], templates, h0[i: i + 1], objective)
             for i, (r, t) in enumerate(zip(requests, targets, strict=True))]
    t_loop = time.perf_counter() - started
    rss_loop = peak_rss_mb()

    delta_loop = torch.cat([a.delta for a in alone])
    diff = float((batched.delta - delta_loop).abs().max())
    result = {"model": path, "n": n, "layer": top, "templates": len(templates),
              "batched_s": t_batched, "loop_s": t_loop, "ratio": t_loop / t_batched,
              "max_abs_diff": diff, "steps_mean": batched.summary()["steps"],
              "prob_after": batched.summary()["prob_after"],
              "peak_rss_batched_mb": rss_batched, "peak_rss_after_loop_mb": rss_loop}
    print(result)
    if write:
        write_section(result)
    return result


def write_section(r: dict) -> None:
    section = (
        "## memit\n\n"
        f"z of {r['n']:,} edits (MEMIT's target vectors at layer {r['layer']}, "
        f"{r['templates']} context templates, ≤20 Adam steps each) on `{Path(r['model']).name}`, "
        f"CPU, 1 thread ({platform.processor() or platform.machine()}), "
        "`python -m benchmarks.bench_memit`:\n\n"
        "| variant | wall time | peak RSS |\n|---|---|---|\n"
        f"| one fact after another (reference loop) | {r['loop_s']:.1f} s | "
        f"{r['peak_rss_after_loop_mb']:.0f} MB (process peak after both runs) |\n"
        f"| all facts in one batch (`optimize_deltas`) | {r['batched_s']:.1f} s | "
        f"{r['peak_rss_batched_mb']:.0f} MB |\n\n"
        f"Speed-up **{r['ratio']:.1f}×**; max |δ_batched − δ_loop| = {r['max_abs_diff']:.2e}; "
        f"mean steps {r['steps_mean']:.1f}, mean P(target) reached {r['prob_after']:.2f}.\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    start = text.find("## memit\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of edits")
    parser.add_argument("--layer", type=int, default=None, help="z layer (default: top of "
                        "the middle band)")
    parser.add_argument("--model", default=None, help="an organism directory (default: "
                        "facts-gpt2 if built, else tiny)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    main(args.n, args.layer, not args.no_write, args.model)
