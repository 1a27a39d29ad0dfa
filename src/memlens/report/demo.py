"""``memlens demo``: run every capability that is built on the default organism.

Each capability registers a step here; steps whose module is not built yet are listed as such.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from rich.console import Console

DEFAULT_MODEL = "organism:facts-gpt2"

#: (section title, module that must exist, what it shows)
CAPABILITIES: list[tuple[str, str, str]] = [
    ("Causal tracing", "memlens.trace", "where the organism recalls a fact (ROME §2)"),
    ("ROME", "memlens.edit.rome", "one rank-one edit with before/after evaluation"),
    ("MEMIT", "memlens.edit.memit", "a batch of edits and the scaling curve"),
    ("Paragraph memorization", "memlens.memorization", "scan, heads and sparse unlearning"),
    ("TopK LMs", "memlens.topk", "training comparison, neuron entropies and steering"),
]


def _built(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return False
    return True


def run_demo(out: Path, model: str = DEFAULT_MODEL) -> Path:
    """Build the default organism, run the built capabilities, and write ``out/summary.json``."""
    from memlens.model import load_model

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    handle = load_model(model)
    summary: dict = {"model": handle.info(), "sections": {}}
    console.print(f"[bold]model[/] {model}: {handle.n_layers} layers, d_model {handle.d_model}, "
                  f"{handle.n_params:,} parameters")
    for title, module, what in CAPABILITIES:
        status = "built" if _built(module) else "not built yet"
        summary["sections"][title] = {"module": module, "shows": what, "status": status}
        console.print(f"  {title:<24} {status}: {what}")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path
