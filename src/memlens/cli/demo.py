"""``memlens demo`` and ``memlens report``: the whole story as one HTML page
(:mod:`memlens.studies.demo`, :mod:`memlens.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import DEFAULT_MODEL, ModelOpt, OutOpt, console
from memlens.errors import MemlensError


def demo(
    out: OutOpt = Path("memlens-report"),
    model: ModelOpt = DEFAULT_MODEL,
    sections: Annotated[str | None, typer.Option(
        "--sections", help="Comma-separated subset of: organism, trace, recall, rome, memit, "
        "sequential, memorization, topk.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Seconds-scale settings (smoke run).")]
    = False,
):
    """Run every capability on the default organism and write a self-contained HTML report."""
    from memlens.report.demo import run_demo
    from memlens.studies.demo import DemoConfig

    config = DemoConfig.quick(model) if quick else DemoConfig(model=model)
    if sections:
        config.sections = tuple(s.strip() for s in sections.split(",") if s.strip())
    index = run_demo(out, config)
    console.print(f"[bold green]report:[/] {index.resolve()}")
    console.print(f"[bold green]summary:[/] {(index.parent / 'summary.json').resolve()}")


def report(
    directory: Annotated[Path, typer.Argument(help="A directory written by memlens demo.")],
    screenshot: Annotated[Path | None, typer.Option(
        "--screenshot", help="Also save a PNG of the report as headless Chromium renders it.")]
    = None,
    width: Annotated[int, typer.Option("--width", help="Screenshot width in pixels.")] = 1200,
    height: Annotated[int, typer.Option("--height", help="Screenshot height in pixels.")] = 1600,
):
    """Rebuild the HTML report and summary.json from saved results, without recomputing."""
    from memlens.report.html import build_report

    if not directory.is_dir():
        raise MemlensError(f"{directory} is not a directory of saved results")
    index = build_report(directory)
    console.print(f"[bold green]report:[/] {index}")
    if screenshot is not None:
        from memlens.report.browser import screenshot as take_screenshot

        take_screenshot(index, screenshot, width=width, height=height)
        console.print(f"[bold green]screenshot:[/] {screenshot}")


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(report)
