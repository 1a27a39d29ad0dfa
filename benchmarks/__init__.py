"""Benchmarks: `python -m benchmarks.bench_<topic>` writes its section of RESULTS.md."""
