"""Scan throughput: batched KV-cached greedy decoding vs one paragraph at a time without cache.

    python -m benchmarks.bench_memorization     # writes the "## memorization scan" section

A randomly initialised GPT-Neo of the facts-neo organism's size (6 layers × 256, 8 heads,
vocab 4096, context 128) scans 100-token paragraphs (50-token prefix, 50 greedy tokens, plus the
teacher-forced suffix NLL) with memlens' scan (batches of 32, KV cache) and with the naive loop
(one paragraph, the whole sequence re-run for every new token). Speed does not depend on the
weights. Both run in the same process, alternating, on one thread; EM and NLL of the paragraphs
both scored are checked to agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.results import write_section

SECTION = "## memorization scan"


def _model():
    import transformers as tf

    config = tf.GPTNeoConfig(num_layers=6, hidden_size=256, num_heads=8, vocab_size=4096,
                             attention_types=[[["global", "local"], 3]], window_size=128,
                             max_position_embeddings=128, intermediate_size=1024,
                             bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def measure(n_batched: int, n_naive: int, rounds: int) -> dict[str, float]:
    """Paragraphs/s of both scans (median over rounds) and whether their results agree."""
    from memlens.memorization.scan import evaluate

    model = _model()
    ids = torch.randint(0, 4096, (n_batched, 100), generator=torch.Generator().manual_seed(0))
    batched, naive, agree = [], [], True
    for _ in range(rounds):
        start = time.perf_counter()
        fast = evaluate(model, ids, 50, batch_size=32, use_cache=True)
        batched.append(n_batched / (time.perf_counter() - start))
        start = time.perf_counter()
        slow = [evaluate(model, ids[i:i + 1], 50, batch_size=1, use_cache=False)
                for i in range(n_naive)]
        naive.append(n_naive / (time.perf_counter() - start))
        agree &= all(int(s.em[0]) == int(fast.em[i]) and
                     abs(float(s.nll[0]) - float(fast.nll[i])) < 1e-4
                     for i, s in enumerate(slow))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"batched": med(batched), "naive": med(naive), "agree": agree}


def write(result: dict[str, float], args: argparse.Namespace) -> None:
    lines = [
        SECTION, "",
        "`python -m benchmarks.bench_memorization` — random GPT-Neo of facts-neo size "
        "(6×256, vocab 4096), 100-token paragraphs (50 prefix + 50 greedy), 1 thread, "
        f"median of {args.rounds} alternating rounds; shared 2-core machine.", "",
        "| scan | paragraphs/s |", "|---|---|",
        f"| memlens `scan` (batches of 32, KV cache; {args.n_batched} paragraphs) | "
        f"{result['batched']:.2f} |",
        f"| one paragraph at a time, no cache ({args.n_naive} paragraphs) | "
        f"{result['naive']:.2f} |",
        f"| **speed-up** | **{result['batched'] / result['naive']:.1f}×** |", "",
        f"EM and NLL identical on the paragraphs both scored: {result['agree']}.", "", "",
    ]
    write_section("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-batched", type=int, default=64)
    parser.add_argument("--n-naive", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.n_batched, args.n_naive, args.rounds)
    print(result)
    write(result, args)


if __name__ == "__main__":
    main()
