"""Causal tracing: memlens' batched algorithm vs the naive algorithm of the reference code.

    python -m benchmarks.bench_trace            # writes the "## causal tracing" section of RESULTS.md

Both trace one fact for all three kinds (hidden, mlp, attn; S = 10 samples, window 10) on the
same model in the same process, alternating, one thread. The naive algorithm is
:func:`memlens.trace.reference.naive_trace` (as kmeng01/rome's ``trace_with_patch`` loop: one
forward pass of the whole model with a batch of 1 + S per (kind, token, layer)). The model is
``organism:facts-gpt2`` (its first known fact) when it is already built (this script never
builds it), and a random 6-layer × 256 GPT-2 with a subject-first prompt (the least favourable
case: no token precedes the subject).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.results import write_section
from memlens.trace import trace_fact
from memlens.trace.reference import naive_trace

SECTION = "## causal tracing"
KINDS = ("hidden", "mlp", "attn")


def _cases():
    """(handle, prompt, subject, description) to time: the organism's first known fact if the
    organism is built, and always a subject-first prompt on a random 6×256 GPT-2."""
    from memlens.arch import adapter_for
    from memlens.model import ModelHandle, load_model
    from memlens.organisms.registry import is_built, organism_dir
    from memlens.testing import random_model

    if is_built(organism_dir("facts-gpt2")):
        import json

        handle = load_model("organism:facts-gpt2", device="cpu")
        fact = json.loads((organism_dir("facts-gpt2") / "known_facts.json").read_text())[0]
        yield handle, fact["prompt"], fact["subject"], "organism:facts-gpt2 (6×256 GPT-2)"
    model, tokenizer = random_model("gpt2", vocab_size=4096, n_layer=6, n_embd=256, n_head=8,
                                    n_inner=1024)
    handle = ModelHandle(model, tokenizer, adapter_for(model), ref="random-gpt2-6x256")
    yield handle, "Miles Davis plays the", "Miles Davis", "random 6×256 GPT-2, vocab 4096"


def _measure(handle, prompt: str, subject: str, description: str, rounds: int,
             samples: int) -> str:
    kw = dict(kinds=KINDS, samples=samples, seed=0)
    times: dict[str, list[float]] = {"naive": [], "memlens": []}
    results = {}
    for _ in range(rounds):
        for name, fn in (("naive", naive_trace), ("memlens", trace_fact)):
            start = time.perf_counter()
            results[name] = fn(handle, prompt, subject, **kw)
            times[name].append(time.perf_counter() - start)
    naive, fast = (statistics.median(times[k]) for k in ("naive", "memlens"))
    diff = max(float(np.abs(results["naive"].scores[k] - results["memlens"].scores[k]).max())
               for k in KINDS)
    n_tokens = len(results["memlens"].tokens)
    return (f"| {description} | {prompt!r} ({n_tokens} tokens, subject "
            f"{list(results['memlens'].subject_range)}) | {naive:.2f} | {fast:.2f} | "
            f"**{naive / fast:.1f}×** | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for case in _cases():
        rows.append(_measure(*case, rounds=args.rounds, samples=args.samples))
        print(rows[-1])
    body = "\n".join([
        SECTION, "",
        f"`python -m benchmarks.bench_trace --rounds {args.rounds}` ({time.strftime('%Y-%m-%d')}"
        f", 1 thread, CPU shared with other processes; median of {args.rounds} alternating "
        f"rounds). One fact, kinds hidden + mlp + attn, S = {args.samples}, window 10. Naive = "
        "`memlens.trace.reference.naive_trace` (the reference's loop: one whole-model forward "
        "pass of batch 1 + S per (kind, token, layer)); memlens = `trace_fact` (clean and "
        "corrupted runs once; per token one batched pass over positions ≥ t from the corrupted "
        "run's KV cache, each block run only on the rows a restoration can change; no-op and "
        "duplicate restorations skipped). Max |Δscore| compares the two results.", "",
        "| model | prompt | naive s | memlens s | speed-up | max abs Δscore |",
        "|---|---|---|---|---|---|",
        *rows, "",
    ])
    write_section(body)


if __name__ == "__main__":
    main()
