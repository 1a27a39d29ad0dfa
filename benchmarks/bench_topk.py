"""Training speed of a TopK LM vs its dense twin, measured side by side in one run.

    python -m benchmarks.bench_topk            # writes the "## topk training" section of RESULTS.md

Organism-sized models (6 layers × 256, vocab 4096, 128-token blocks, batch 16; GPT-2 and Llama
layouts, k = d_ff / 16) train with the organisms trainer on random tokens (speed does not depend
on the data). Dense and TopK alternate in rounds so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.results import write_section

SECTION = "## topk training"


def _model(arch: str):
    import transformers as tf

    common = dict(vocab_size=4096, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    if arch == "gpt2":
        config = tf.GPT2Config(n_layer=6, n_embd=256, n_head=8, n_positions=128, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        config = tf.LlamaConfig(num_hidden_layers=6, hidden_size=256, num_attention_heads=8,
                                num_key_value_heads=8, intermediate_size=672,
                                max_position_embeddings=128, **common)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config)


def measure(arch: str, steps: int, rounds: int) -> dict[str, float]:
    """Tokens/s of dense and TopK training (median over rounds of `steps` steps each)."""
    from memlens.arch import adapter_for
    from memlens.topk import to_topk
    from memlens.topk.train import AlphaSchedule
    from memlens.trainer import TrainConfig, train

    data = torch.randint(0, 4096, (steps * 16, 128))
    cfg = TrainConfig(steps=steps, batch_size=16, warmup_steps=1, num_threads=2, progress=False)
    speeds: dict[str, list[float]] = {"dense": [], "topk": []}
    for _ in range(rounds):
        for name in ("dense", "topk"):
            model = _model(arch)
            callbacks = []
            if name == "topk":
                d_ff = adapter_for(model).get_edit_weight(model, 0).shape[1]
                to_topk(model, d_ff // 16)
                callbacks.append(AlphaSchedule(model, 0.0))  # pure TopK, as after annealing
            start = time.perf_counter()
            result = train(model, data, cfg, callbacks=callbacks)
            speeds[name].append(result.tokens / (time.perf_counter() - start))
    return {name: sorted(values)[len(values) // 2] for name, values in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    for arch in ("gpt2", "llama"):
        speed = measure(arch, args.steps, args.rounds)
        rows.append(f"| {arch} 6×256 | {speed['dense']:,.0f} | {speed['topk']:,.0f} | "
                    f"{speed['topk'] / speed['dense']:.2f} |")
        print(rows[-1])
    body = "\n".join([
        SECTION, "",
        f"`python -m benchmarks.bench_topk --steps {args.steps} --rounds {args.rounds}` "
        f"({time.strftime('%Y-%m-%d')}, 2 threads; 1-min load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after — above 2 the CPU is shared and the ratio is "
        "noisy; median of rounds, dense and TopK alternating). Batch 16 × 128 tokens, "
        "k = d_ff/16, the last 2 of 6 layers dense.", "",
        "| model | dense tokens/s | TopK tokens/s | TopK / dense |", "|---|---|---|---|",
        *rows, "",
    ])
    write_section(body)


if __name__ == "__main__":
    main()
