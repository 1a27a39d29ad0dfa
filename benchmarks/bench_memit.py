"""MEMIT's z for many edits: memlens' batched optimisation vs one fact after another (the
reference's loop), each variant in its own process so that each peak memory is its own.

    python -m benchmarks.bench_memit            # 1,000 edits; writes ## memit in RESULTS.md
    python -m benchmarks.bench_memit --n 100    # quicker
    python -m benchmarks.bench_memit --model DIR --loop-from runs/loop1000   # reuse a loop run

Model: ``--model`` (an organism directory), else organism:facts-gpt2 if it is already built,
else the `tiny` organism (built if needed). ``--loop-from PREFIX`` reads the loop's result from
PREFIX.json / PREFIX.pt (written by ``--variant loop --delta-out PREFIX.pt > PREFIX.json``)
instead of running it: the loop is the slow, unchanging half.

Requests are the organism's CounterFact cases (cycled to reach n). Both variants optimise the
same objective from the same start: the loop calls the optimiser once per fact with whole-model
passes (the reference ``compute_z``); memlens packs facts into batches and runs only what δ can
change (blocks above the z layer, positions from the subject's last token on, the rest cached).
Peak memory: each child process's peak RSS (resource.getrusage). Time: wall clock and the
process's CPU time (user + system), which other jobs on the machine disturb less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import write_section


def pick_model() -> str:
    from memlens.organisms.registry import ensure, is_built, organism_dir

    if is_built(organism_dir("facts-gpt2")):
        return str(organism_dir("facts-gpt2"))
    return str(ensure("tiny", progress=True))


def run_variant(variant: str, n: int, layer: int | None, model: str, out: Path) -> dict:
    """Optimise z of ``n`` requests the ``variant`` way ("batched" or "loop"); save δ to out."""
    from memlens.edit.context import context_templates
    from memlens.edit.keys import fact_token_reads
    from memlens.edit.layers import middle_band
    from memlens.edit.memit import MEMITHyperParams
    from memlens.edit.optimize import DeltaObjective, optimize_deltas
    from memlens.evaluate import load_counterfact
    from memlens.model import load_model
    from memlens.tokens import answer_ids

    torch.set_num_threads(1)
    handle = load_model(model, device="cpu")
    cases = load_counterfact(Path(model) / "counterfact.json")
    requests = [cases[i % len(cases)].request for i in range(n)]
    targets = [answer_ids(handle.tokenizer, r.text, r.target_new) for r in requests]
    hp = MEMITHyperParams.for_model(handle)
    top = layer if layer is not None else middle_band(handle.n_layers)[-1]
    point = f"blocks.{top}.hook_resid_post"
    templates = context_templates(handle, hp.context_templates, seed=hp.context_seed)
    objective = DeltaObjective.from_hparams(hp)
    h0 = fact_token_reads(handle, requests, ["{}"], hp.fact_token, {point: "bare"})[point]
    rss_before = peak_rss_mb()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if variant == "batched":
        result = optimize_deltas(handle, point, requests, targets, templates, h0, objective,
                                 max_batch_tokens=hp.max_batch_tokens, progress=True)
        delta, summary = result.delta, result.summary()
    else:
        alone = [optimize_deltas(handle, point, [r], [t], templates, h0[i: i + 1], objective,
                                 max_batch_tokens=0, suffix_only=False)
                 for i, (r, t) in enumerate(zip(requests, targets, strict=True))]
        delta = torch.cat([a.delta for a in alone])
        summary = {"steps": sum(a.steps[0] for a in alone) / n,
                   "prob_after": sum(a.prob_after[0] for a in alone) / n}
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    torch.save(delta, out)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before, "layer": top, "templates": len(templates),
            "max_steps": objective.steps, "steps_mean": summary["steps"],
            "prob_after": summary["prob_after"], "finished": time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(n: int, layer: int | None, write: bool, model: str | None = None,
         loop_from: Path | None = None) -> dict:
    path = model or pick_model()
    runs = {}
    if loop_from is not None:
        runs["loop"] = json.loads(loop_from.with_suffix(".json").read_text().splitlines()[-1]) \
            | {"delta": torch.load(loop_from.with_suffix(".pt")), "reused": str(loop_from)}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("batched", "loop"):
            if variant in runs:
                continue
            out = Path(tmp) / f"{variant}.pt"
            command = [sys.executable, "-m", "benchmarks.bench_memit", "--variant", variant,
                       "--n", str(n), "--model", path, "--delta-out", str(out)]
            if layer is not None:
                command += ["--layer", str(layer)]
            line = subprocess.run(command, check=True, capture_output=True, text=True,
                                  cwd=Path(__file__).parent.parent).stdout.strip().splitlines()[-1]
            runs[variant] = json.loads(line) | {"delta": torch.load(out)}
    batched, loop = runs["batched"], runs["loop"]
    if loop["delta"].shape != batched["delta"].shape:
        raise SystemExit(f"the reused loop has {loop['delta'].shape[0]} edits, not {n}")
    result = {"model": path, "n": n, "layer": batched["layer"],
              "templates": batched["templates"], "batched_s": batched["seconds"],
              "loop_s": loop["seconds"], "ratio": loop["seconds"] / batched["seconds"],
              "batched_cpu_s": batched["cpu_seconds"], "loop_cpu_s": loop["cpu_seconds"],
              "cpu_ratio": loop["cpu_seconds"] / batched["cpu_seconds"],
              "max_steps": batched["max_steps"], "loop_steps_mean": loop["steps_mean"],
              "batched_finished": batched["finished"], "loop_finished": loop["finished"],
              "batched_load": batched["load"], "loop_load": loop["load"],
              "loop_reused": loop.get("reused"),
              "max_abs_diff": float((batched["delta"] - loop["delta"]).abs().max()),
              "steps_mean": batched["steps_mean"], "prob_after": batched["prob_after"],
              "peak_rss_batched_mb": batched["peak_rss_mb"],
              "peak_rss_loop_mb": loop["peak_rss_mb"],
              "rss_model_mb": min(batched["rss_before_mb"], loop["rss_before_mb"])}
    print({k: v for k, v in result.items()})
    if write:
        write_memit_section(result)
    return result


def write_memit_section(r: dict) -> None:
    write_section(
        "## memit\n\n"
        f"z of {r['n']:,} edits (MEMIT's target vectors at layer {r['layer']}, "
        f"{r['templates']} context templates, ≤{r['max_steps']} Adam steps each) on "
        f"`{Path(r['model']).name}`, CPU, 1 thread ({platform.processor() or platform.machine()}), "
        "`python -m benchmarks.bench_memit`:\n\n"
        "| variant | wall time | CPU time | peak RSS of its process | finished (load) |\n"
        "|---|---|---|---|---|\n"
        f"| one fact after another, whole-model passes (reference loop) | {r['loop_s']:.1f} s | "
        f"{r['loop_cpu_s']:.1f} s | {r['peak_rss_loop_mb']:.0f} MB | {r['loop_finished']} "
        f"({r['loop_load']:.1f}) |\n"
        f"| memlens `optimize_deltas` (batches of facts, only what δ changes) | "
        f"{r['batched_s']:.1f} s | {r['batched_cpu_s']:.1f} s | "
        f"{r['peak_rss_batched_mb']:.0f} MB | {r['batched_finished']} "
        f"({r['batched_load']:.1f}) |\n\n"
        f"(RSS with the model loaded, before optimising: {r['rss_model_mb']:.0f} MB.) "
        f"Speed-up **{r['ratio']:.1f}×** in wall time, **{r['cpu_ratio']:.1f}×** in CPU time; "
        f"max |δ_batched − δ_loop| = {r['max_abs_diff']:.2e}; mean steps "
        f"{r['steps_mean']:.1f} (loop {r['loop_steps_mean']:.1f}), mean P(target) reached "
        f"{r['prob_after']:.2f}. Load: the 1-minute load average when each variant finished "
        f"(2 cores).\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of edits")
    parser.add_argument("--layer", type=int, default=None, help="z layer (default: top of "
                        "the middle band)")
    parser.add_argument("--model", default=None, help="an organism directory (default: "
                        "facts-gpt2 if built, else tiny)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--loop-from", type=Path, default=None, help="PREFIX of a saved loop "
                        "run (PREFIX.json, PREFIX.pt) to reuse instead of running the loop")
    parser.add_argument("--variant", choices=("batched", "loop"), help=argparse.SUPPRESS)
    parser.add_argument("--delta-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.n, args.layer, args.model,
                                     args.delta_out)))
    else:
        main(args.n, args.layer, not args.no_write, args.model, args.loop_from)
