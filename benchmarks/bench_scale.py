"""Paper scale on this CPU: random-initialised full-size GPT-2 XL and Llama-3.2-1B shapes, in
float32 and bfloat16 — one causal trace (hidden, mlp, attn) of one fact, key statistics of one
layer, one ROME edit, one MEMIT batch of 10 — with the time and peak memory of each.

    python -m benchmarks.bench_scale                 # all four runs; writes ## paper scale
    python -m benchmarks.bench_scale --models gpt2-xl --dtypes bfloat16   # one run

Each (model, dtype) runs in its own process so that its peak RSS (``resource.getrusage``,
monotone, so read after each stage) is its own. The models are built without paying for
``torch.nn.init``: the skeleton is made under accelerate's ``init_empty_weights`` (parameters
on the meta device), then each parameter is materialised directly in the target dtype with
a seeded N(0, 0.02) draw (norm weights 1, biases 0); tied weights stay tied. Nothing here
measures model quality: the weights are random, the sample counts small. Not part of
``make test``.

C must see more tokens than d_ff (6,400 for GPT-2 XL, 8,192 for Llama-3.2-1B), else it is
singular and ROME/MEMIT refuse it: hence 300 texts of ≤ 64 tokens (~13k tokens), which makes
the statistics, not the trace, the longest stage. A first run with 16 texts (720 tokens)
stopped at ROME for that reason after GPT-2 XL float32 build 15 CPU s (6.18 GiB), causal trace
153 CPU s (7.14 GiB), statistics 33 CPU s (7.61 GiB); budget ~30-40 CPU minutes for all four.
"""

from __future__ import annotations

import argparse
import dataclasses
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

SECTION = "## paper scale"

#: Full-size configurations (the published config.json values that set the shapes).
CONFIGS: dict[str, dict] = {
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, n_inner=None,
                    n_positions=1024, vocab_size=50257),
    "llama-3.2-1b": dict(model_type="llama", num_hidden_layers=16, hidden_size=2048,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
}

FACTS = [  # (prompt, subject, target_new); words of memlens.testing.TEXT
    ("{} is a city in", "Toulouse", " Japan"),
    ("{} plays the", "Miles Davis", " capital"),
    ("The capital of {} is", "Japan", " Paris"),
    ("{} is located in", "The Eiffel Tower", " Tokyo"),
    ("{} was founded by", "Apple", " Miles"),
    ("{}'s mother tongue is", "Danielle Darrieux", " Japan"),
    ("{} is a city in", "Paris", " Tokyo"),
    ("{} plays the", "Steve Jobs", " trumpet"),
    ("The capital of {} is", "France", " Toulouse"),
    ("{} is located in", "Tokyo", " France"),
]
TEMPLATES = ["{}", "The capital is located. {}", "Miles Davis plays the trumpet. {}"]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def build(name: str, dtype: torch.dtype, seed: int = 0):
    """A ModelHandle of the full-size ``name`` shape with random weights, built in seconds."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from memlens.arch import adapter_for
    from memlens.model import ModelHandle
    from memlens.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=2000)  # whole words: short prompts
    spec = dict(CONFIGS[name])
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(spec.pop("model_type"), bos_token_id=eos, eos_token_id=eos,
                                  pad_token_id=eos, **spec)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tie on the meta device, so the tied matrix is materialised once
    generator = torch.Generator().manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}  # id(meta parameter) → real one (keeps ties)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                value = torch.empty(param.shape, dtype=dtype)
                if key == "bias":
                    value.zero_()
                elif param.dim() == 1:  # LayerNorm / RMSNorm weight
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, 0.02, generator=generator)
                made[id(param)] = torch.nn.Parameter(value, requires_grad=False)
            module._parameters[key] = made[id(param)]
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"still on the meta device: {leftover[:5]}")
    if getattr(config, "tie_word_embeddings", False) and \
            model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("the unembedding is not tied to the embedding")
    model.eval()
    return ModelHandle(model=model, tokenizer=tokenizer, arch=adapter_for(model), ref=name)


def run_child(name: str, dtype_name: str, args: argparse.Namespace) -> dict:
    """Every stage on one (model, dtype); returns seconds and peak RSS after each."""
    from memlens.allocator import return_freed_memory
    from memlens.edit import EditRequest
    from memlens.edit.hparams import ROMEHyperParams
    from memlens.edit.layers import middle_band
    from memlens.edit.memit import MEMITHyperParams, apply_memit
    from memlens.edit.rome import apply_rome
    from memlens.stats import layer_stats
    from memlens.testing import random_text
    from memlens.trace import trace_fact

    return_freed_memory()  # as the memlens command line does before each command
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    stages: list[dict] = []
    cpu_start = [time.process_time()]  # CPU seconds: the machine is shared, wall time is not ours

    def stage(label: str, start: float, **extra) -> None:
        cpu = time.process_time() - cpu_start[0]
        cpu_start[0] = time.process_time()
        stages.append({"stage": label, "seconds": round(time.perf_counter() - start, 2),
                       "cpu_seconds": round(cpu, 2),
                       "peak_rss_gib": round(_rss_gib(), 2), **extra})
        print(f"  {name} {dtype_name} {label}: {stages[-1]}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    handle = build(name, dtype)
    stage("build", start, n_params=handle.n_params)
    corpus = Path(args.tmp) / "corpus.txt"
    corpus.write_text(random_text(args.stats_samples, (20, 60), seed=1))
    prompt, subject, _ = FACTS[0]

    start = time.perf_counter()
    with torch.no_grad():
        trace = trace_fact(handle, prompt.format(subject), subject, kinds=("hidden", "mlp", "attn"),
                           samples=args.samples, noise=0.1, window=10)
    stage("causal trace", start, tokens=len(trace.tokens), samples=args.samples)

    layer = handle.n_layers // 2
    start = time.perf_counter()
    stats = layer_stats(handle, [layer], corpus=corpus, n_samples=args.stats_samples,
                        max_len=args.max_len, progress=False, cache=False)
    stage("key statistics", start, layer=layer, tokens=stats[layer].count)
    if stats[layer].count <= handle.d_ff:  # C would be singular: ROME/MEMIT refuse it
        raise SystemExit(f"{stats[layer].count} corpus tokens ≤ d_ff = {handle.d_ff}: raise "
                         "--stats-samples")

    requests = [EditRequest(p, s, t) for p, s, t in FACTS]
    rome_hp = dataclasses.replace(ROMEHyperParams.for_model(handle), layer=layer,
                                  v_num_grad_steps=args.steps, v_stop_loss=0.0)
    start = time.perf_counter()
    edit = apply_rome(handle, requests[0], layer=layer, hparams=rome_hp, stats=stats,
                      templates=TEMPLATES, check_current=False)
    stage("ROME edit", start, steps=edit.log["v_star"].get("steps"))
    edit.undo()
    del stats, edit

    band = middle_band(handle.n_layers)
    memit_hp = dataclasses.replace(MEMITHyperParams.for_model(handle), v_num_grad_steps=args.steps,
                                   v_stop_loss=0.0, mom2_n_samples=args.stats_samples,
                                   mom2_max_len=args.max_len)
    start = time.perf_counter()
    apply_memit(handle, requests[:args.batch], layers=band, hparams=memit_hp,
                corpus=str(corpus), templates=TEMPLATES, check_current=False, progress=False)
    stage("MEMIT batch", start, n=args.batch, layers=f"{band[0]}-{band[-1]}",
          note="incl. statistics of its layers")
    return {"model": name, "dtype": dtype_name, "n_layers": handle.n_layers,
            "d_ff": handle.d_ff, "n_params": handle.n_params, "stages": stages,
            "peak_rss_gib": round(_rss_gib(), 2)}


def _table(results: list[dict]) -> list[str]:
    labels = [s["stage"] for s in results[0]["stages"]]
    head = "| model | dtype | " + " | ".join(f"{label} s" for label in labels) + \
        " | total s | peak RSS GiB |"
    rows = [head, "|" + "---|" * (len(labels) + 4)]
    for r in results:  # CPU seconds (wall seconds)
        cpu = [s["cpu_seconds"] for s in r["stages"]]
        wall = [s["seconds"] for s in r["stages"]]
        rows.append(f"| {r['model']} ({r['n_params'] / 1e9:.2f}B, {r['n_layers']} layers) | "
                    f"{r['dtype']} | " + " | ".join(f"{c:.1f} ({w:.0f})" for c, w in
                                                    zip(cpu, wall, strict=True))
                    + f" | {sum(cpu):.0f} ({sum(wall):.0f}) | {r['peak_rss_gib']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="gpt2-xl,llama-3.2-1b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--samples", type=int, default=1, help="trace noise samples")
    parser.add_argument("--stats-samples", type=int, default=300,
                        help="corpus texts for C (their tokens must exceed d_ff: ≥ 8,192)")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="Adam steps of v* / z")
    parser.add_argument("--batch", type=int, default=10, help="MEMIT requests")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, dtype_name = args.child.split(":")
        os.environ["MEMLENS_HOME"] = args.tmp
        print(json.dumps(run_child(name, dtype_name, args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for dtype_name in args.dtypes.split(","):
                cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--child",
                       f"{name}:{dtype_name}", "--tmp", tmp,
                       *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                         ("samples", "stats_samples", "max_len", "steps", "batch", "threads")]]
                print(f"== {name} {dtype_name}", flush=True)
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    ratios = []
    for name in args.models.split(","):
        peak = {r["dtype"]: r["peak_rss_gib"] for r in results if r["model"] == name}
        if "float32" in peak and "bfloat16" in peak:
            ratios.append(f"{name}: bfloat16 peak = {peak['bfloat16'] / peak['float32']:.2f}× "
                          "float32")
    body = "\n".join([
        SECTION, "",
        f"`python -m benchmarks.bench_scale` ({platform.processor() or platform.machine()}, "
        f"{args.threads} thread, 2 shared cores, torch {torch.__version__}). Random-initialised "
        "full-size configurations built on the meta device and materialised in the target dtype "
        "(no downloads, no `torch.nn.init`). Stages: one causal trace of \"Toulouse is a city "
        f"in\" (hidden, mlp, attn; {args.samples} noise samples, window 10); key statistics of "
        f"the middle layer ({args.stats_samples} texts, ≤ {args.max_len} tokens); one ROME edit "
        f"at that layer ({len(TEMPLATES)} context templates, {args.steps} Adam steps); one MEMIT "
        f"batch of {args.batch} over the default middle band ({args.steps} steps, its statistics "
        "computed inside the stage). Peak RSS is the process's high-water mark "
        "(`ru_maxrss`) after the whole run. Times are CPU seconds of the process (wall seconds in "
        "brackets: the 2 cores were shared with other jobs, so wall time overstates). The statistics, solves and v*/z optimisation run in "
        "float32/float64 in both dtypes.", "",
        *_table(results), "",
        *[f"- {line}" for line in ratios], "",
        "Per-stage peak RSS (GiB, cumulative): " + "; ".join(
            f"{r['model']} {r['dtype']}: " + ", ".join(f"{s['stage']} {s['peak_rss_gib']}"
                                                       for s in r["stages"])
            for r in results), "",
    ])
    print(body)
    write_section(body)


if __name__ == "__main__":
    main()
