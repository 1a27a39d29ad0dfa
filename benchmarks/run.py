"""Run every benchmark in turn (``make bench``); each writes its own section of RESULTS.md."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["bench_trace", "bench_stats", "bench_memorization", "bench_memit", "bench_topk",
              "bench_organism_training", "bench_scale"]


def main() -> None:
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=True)


if __name__ == "__main__":
    main()
