"""``memlens info``: what memlens sees in a model."""

from __future__ import annotations

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    console,
    print_json,
)


def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False, device: DeviceOpt = None,
         dtype: DtypeOpt = None):
    """Architecture, sizes and the module names memlens edits."""
    from memlens.model import load_model

    handle = load_model(model, device=device, dtype=dtype)
    summary = handle.info()
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"memlens info: {model}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(info)
