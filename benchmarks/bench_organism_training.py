"""Training throughput of the default organism's model, eager vs ``torch.compile``, side by side.

    python -m benchmarks.bench_organism_training   # writes "## organism training" in RESULTS.md

The facts-gpt2 model (6×256 GPT-2, vocab 4096) trains with the organisms trainer on random
128-token blocks at the organism's batch (8); eager and compiled alternate in rounds so that
load from other processes hits both. The compiled model's first call (compilation) is timed
apart. From the eager speed the table also gives the training time of the organism's step
budget — the number behind facts-gpt2's build time.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.results import write_section

SECTION = "## organism training"


def measure(steps: int, rounds: int) -> dict[str, float]:
    """Median tokens/s of eager and compiled training, and the compile time in seconds."""
    from memlens.organisms.build import make_model
    from memlens.organisms.registry import ORGANISMS
    from memlens.trainer import TrainConfig, train

    spec = ORGANISMS["facts-gpt2"]
    data = torch.randint(0, spec.vocab_size, (steps * spec.batch_size, spec.block_size))
    cfg = TrainConfig(steps=steps, batch_size=spec.batch_size, warmup_steps=1, num_threads=2,
                      progress=False)
    speeds: dict[str, list[float]] = {"eager": [], "compiled": []}
    compile_seconds = 0.0
    for r in range(rounds):
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            model = make_model(spec, spec.vocab_size, 0)
            if name == "compiled":
                model = torch.compile(model)
                if r == 0:  # compile on one warm-up step, outside the timed run
                    start = time.perf_counter()
                    train(model, data[: spec.batch_size], TrainConfig(
                        steps=1, batch_size=spec.batch_size, warmup_steps=1, progress=False))
                    compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
            result = train(model, data, cfg)
            speeds[name].append(result.tokens / (time.perf_counter() - start))
    out = {name: sorted(v)[len(v) // 2] for name, v in speeds.items()}
    out["compile_seconds"] = compile_seconds
    out["budget_tokens"] = spec.steps * spec.batch_size * spec.block_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    m = measure(args.steps, args.rounds)
    eager_train_min = m["budget_tokens"] / m["eager"] / 60
    compiled_train_min = (m["budget_tokens"] / m["compiled"] + m["compile_seconds"]) / 60
    text = (
        f"{SECTION}\n\n`python -m benchmarks.bench_organism_training --steps {args.steps} "
        f"--rounds {args.rounds}` ({time.strftime('%Y-%m-%d')}, 2 threads, median of rounds, "
        "eager and compiled alternating). facts-gpt2's model (6×256 GPT-2, 5.8M parameters), "
        "batch 8 × 128 random tokens, organisms trainer.\n\n"
        "| training | tokens/s | facts-gpt2's 2,000 steps |\n|---|---|---|\n"
        f"| eager (what the build uses) | {m['eager']:,.0f} | {eager_train_min:.1f} min |\n"
        f"| `torch.compile` (+ {m['compile_seconds']:.0f} s compiling) | {m['compiled']:,.0f} | "
        f"{compiled_train_min:.1f} min |\n"
        f"| **compiled / eager** | **{m['compiled'] / m['eager']:.2f}×** | |\n"
    )
    write_section(text)


if __name__ == "__main__":
    main()
