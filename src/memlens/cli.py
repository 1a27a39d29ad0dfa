"""The ``memlens`` command line: a thin layer over the Python API, one call per command.

Heavy imports (torch, transformers, matplotlib) happen inside commands so that
``memlens --help`` answers at once. Errors memlens raises on purpose print as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Locate, edit, erase and steer what a transformer LM knows and has memorized.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local directory, or organism:NAME.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory for results and figures.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 or auto.")]

DEFAULT_MODEL = "organism:facts-gpt2"


def print_json(data: object) -> None:
    """Write ``data`` as JSON to stdout (no rich markup, so it pipes cleanly)."""
    typer.echo(json.dumps(data, indent=2, default=str))


# ── core ──────────────────────────────────────────────────────────────────────


@app.command()
def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False, device: DeviceOpt = None):
    """Architecture, sizes and the module names memlens edits."""
    from memlens.model import load_model

    handle = load_model(model, device=device)
    summary = handle.info()
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"memlens info: {model}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


# ── organisms (memlens.organisms) ────────────────────────────────────────────

organism_app = typer.Typer(help="Build and evaluate the model organisms memlens trains itself.",
                           no_args_is_help=True)
app.add_typer(organism_app, name="organism")


# ── causal tracing (memlens.trace) ──────────────────────────────────────────


# ── statistics, editing and evaluation (memlens.stats, memlens.edit, memlens.evaluate) ──

edit_app = typer.Typer(help="Edit facts: ROME, MEMIT, fine-tuning baselines.",
                       no_args_is_help=True)
app.add_typer(edit_app, name="edit")
eval_app = typer.Typer(help="Evaluate a model or an editor (CounterFact, zsRE).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


# ── paragraph memorization (memlens.memorization) ───────────────────────────

memorization_app = typer.Typer(help="Find, localize, unlearn and edit memorized paragraphs.",
                               no_args_is_help=True)
app.add_typer(memorization_app, name="memorization")


# ── TopK language models (memlens.topk) ─────────────────────────────────────

topk_app = typer.Typer(help="Train TopK LMs, read their neurons, steer with them.",
                       no_args_is_help=True)
app.add_typer(topk_app, name="topk")


# ── demo and report (memlens.report) ────────────────────────────────────────


@app.command()
def demo(out: OutOpt = Path("memlens-report")):
    """Run every built capability on the embedded default organism and write a report."""
    from memlens.report.demo import run_demo

    index = run_demo(out)
    console.print(f"[bold green]report:[/] {index}")


@app.command()
def report(directory: Annotated[Path, typer.Argument(help="A directory written by memlens demo.")]):
    """Rebuild the HTML report and summary.json from saved results, without recomputing."""
    from memlens.report.html import build_report

    if not directory.is_dir():
        raise MemlensError(f"{directory} is not a directory of saved results")
    index = build_report(directory)
    console.print(f"[bold green]report:[/] {index}")


def main() -> None:
    """Console-script entry point: run the app, turning memlens errors into one-line messages."""
    try:
        app()
    except MemlensError as exc:
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(2) from None
