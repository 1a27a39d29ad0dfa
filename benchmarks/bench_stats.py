"""Key statistics: all layers in one corpus pass vs one pass per layer (the reference's way).

    python -m benchmarks.bench_stats            # writes the "## key statistics" section of RESULTS.md

Both compute C = E[k kᵀ] for 6 layers over the same corpus samples with
:func:`memlens.stats.layer_stats` (no cache), in the same process, alternating, one thread:
once with ``layers=[0..5]`` and once as six calls with one layer each (kmeng01/rome's
``layer_stats`` runs once per layer; each pass stops after its layer, as the reference's
``Trace(stop=True)`` does). The model is ``organism:facts-gpt2`` when it is already built
(this script never builds it), else a random 6-layer × 256 GPT-2 (d_ff 1024, vocab 4096).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import write_section
from memlens.stats import layer_stats

SECTION = "## key statistics"
LAYERS = list(range(6))


def _model_and_corpus(tmp: Path):
    from memlens.model import ModelHandle, load_model
    from memlens.organisms.registry import is_built, organism_dir

    if is_built(organism_dir("facts-gpt2")):
        handle = load_model("organism:facts-gpt2", device="cpu")
        return handle, None, "organism:facts-gpt2 (6×256, d_ff 1024)", "its corpus.txt"
    from memlens.arch import adapter_for
    from memlens.testing import random_model, random_text

    model, tok = random_model("gpt2", vocab_size=4096, n_layer=6, n_embd=256, n_head=8,
                              n_inner=1024, n_positions=256)
    handle = ModelHandle(model=model, tokenizer=tok, arch=adapter_for(model), ref="random")
    corpus = tmp / "corpus.txt"
    corpus.write_text(random_text(400, 120))
    return handle, corpus, "random GPT-2 6×256 (d_ff 1024)", "random words, ~400 tokens/line"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MEMLENS_HOME"] = tmp
        handle, corpus, model_name, corpus_name = _model_and_corpus(Path(tmp))
        kwargs = dict(corpus=corpus, n_samples=args.samples, max_len=128, progress=False,
                      cache=False)
        one, six = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            together = layer_stats(handle, LAYERS, **kwargs)
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            alone = {layer: layer_stats(handle, [layer], **kwargs)[layer] for layer in LAYERS}
            six.append(time.perf_counter() - start)
    diff = max(float((together[i].mom2 - alone[i].mom2).abs().max()) for i in LAYERS)
    t_one, t_six = statistics.median(one), statistics.median(six)
    tokens = together[0].count
    row = (f"| {model_name} | {args.samples} samples ({tokens:,} tokens) | {t_six:.2f} | "
           f"{t_one:.2f} | {t_six / t_one:.2f}× | {diff:.1e} |")
    print(row)
    body = "\n".join([
        SECTION, "",
        f"`python -m benchmarks.bench_stats` (2 shared CPU cores, 1 thread, median of "
        f"{args.rounds} alternating rounds). C = E[k kᵀ] of layers 0–5 over {corpus_name}, "
        "≤ 128 tokens per sample, float64 sums. Six passes = one `layer_stats` call per layer "
        "(the reference's way; each pass stops after its layer); one pass = one call with all "
        "six layers. Max |ΔC| compares the two results.", "",
        "| model | corpus | six passes s | one pass s | speed-up | max abs ΔC |",
        "|---|---|---|---|---|---|",
        row, "",
    ])
    write_section(body)


if __name__ == "__main__":
    main()
