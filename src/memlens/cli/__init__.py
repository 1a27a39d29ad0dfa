"""The ``memlens`` command line: a thin layer over the Python API, one call per command.

One module per command group (:mod:`~memlens.cli.organism`, :mod:`~memlens.cli.trace`, ...),
each with a ``register(app)``; the options several groups share live in
:mod:`memlens.cli.options`. Heavy imports (torch, transformers, matplotlib) happen inside
commands so that ``memlens --help`` answers at once. Errors memlens raises on purpose print as
one line. Nothing in memlens imports this package: it is the top of the stack
(docs/architecture.md).
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from memlens.cli import (
    anatomy,
    bench,
    demo,
    edit,
    evaluate,
    info,
    memorization,
    organism,
    stats,
    topk,
    trace,
)
from memlens.cli.options import offer_device_map
from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Locate, edit, erase and steer what a transformer LM knows and has memorized.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# --help lists the commands, then the groups, each in this order
for group in (info, organism, trace, anatomy, edit, evaluate, stats, bench, memorization, topk,
              demo):
    group.register(app)
offer_device_map(app)  # --device-map and --offload-folder wherever --device is offered


def main() -> None:
    """Console-script entry point: run the app, turning memlens errors (and file-system errors
    such as a full disk) into one-line messages and exit code 2. MEMLENS_DEBUG=1 re-raises
    them with their traceback."""
    try:
        from memlens.allocator import return_freed_memory
        from memlens.files import check_unicode

        return_freed_memory()  # a billion-parameter model's freed activations go back at once

        for i, arg in enumerate(sys.argv[1:], start=1):
            check_unicode(arg, f"command-line argument {i}")
        app()
    except (MemlensError, OSError) as exc:
        if os.environ.get("MEMLENS_DEBUG") == "1":
            raise
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] "
                                                   f"{escape(_one_line(str(exc)))}")
        raise SystemExit(2) from None


def _one_line(message: str) -> str:
    """``message`` on one printable line: whitespace runs become one space; control and format
    characters (NUL, right-to-left overrides, zero-width spaces) and lone surrogates show as
    their escapes."""
    import unicodedata

    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch
                   for ch in " ".join(message.split()))


__all__ = ["app", "main"]
