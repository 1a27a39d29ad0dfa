"""``memlens organism list|build|ship|eval``: the model organisms (:mod:`memlens.organisms`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import JsonOpt, console, print_json

organism_app = typer.Typer(help="Build and evaluate the model organisms memlens trains itself.",
                           no_args_is_help=True)

OrganismArg = Annotated[str, typer.Argument(help="Organism name (see `memlens organism list`).")]


@organism_app.command("list")
def organism_list(as_json: JsonOpt = False):
    """Known organisms: shipped (with memlens), cached (built here) or not built, and the path
    that loading each one uses."""
    from memlens.organisms.registry import ORGANISMS, is_built, organism_dir, shipped_copy

    rows = []
    for n, s in ORGANISMS.items():
        shipped, why_not = shipped_copy(n)
        cached = is_built(organism_dir(n))
        status = ("shipped" if shipped else "cached" if cached else "not built") + (
            f" (shipped copy unusable: {why_not})" if why_not else "")
        rows.append({"name": n, "status": status, "shipped": shipped is not None,
                     "cached": cached, "path": str(shipped or organism_dir(n)), "arch": s.arch,
                     "layers": s.n_layer, "d_model": s.d_model, "description": s.description})
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title="memlens organisms")
    for col in ("name", "arch", "size", "status", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["arch"], f"{r['layers']}×{r['d_model']}", r["status"],
                      r["description"])
    console.print(table)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    for k, v in summary.items():
        console.print(f"{k}: {v}")


@organism_app.command("build")
def organism_build(name: OrganismArg, as_json: JsonOpt = False,
                   from_scratch: Annotated[bool, typer.Option(
                       "--from-scratch", help="Ignore the shipped copy: train the organism into "
                       "the cache (facts-gpt2: ~1 h on 2 cores), or use the cache build.")] = False):
    """Print where an organism is (its shipped copy, or the cache build), building (training) it
    first if needed."""
    import time

    from memlens.organisms.registry import ensure

    start = time.perf_counter()
    path = ensure(name, progress=not as_json, from_scratch=from_scratch)
    meta = json.loads((path / "organism.json").read_text())
    _print_summary({"name": meta["name"], "path": str(path), "n_params": meta["n_params"],
                    "n_facts": meta["n_facts"], "n_known_facts": meta["n_known_facts"],
                    "train_seconds": meta["train_seconds"],
                    "build_seconds": meta.get("build_seconds"),
                    "command_seconds": round(time.perf_counter() - start, 1),
                    "final_loss": meta["final_loss"]}, as_json)


@organism_app.command("ship")
def organism_ship(name: OrganismArg, as_json: JsonOpt = False,
                  build: Annotated[Path | None, typer.Option(
                      "--build", help="Directory of the complete build to ship (default: the "
                      "cache build of the spec's current key).")] = None):
    """Maintainers only: copy a finished build into the package, with its MANIFEST.json
    (src/memlens/organisms/shipped/NAME/, committed to the repository), replacing the shipped
    copy. Run it in a repository checkout after `memlens organism build NAME --from-scratch`."""
    from memlens.organisms.ship import ship

    path = ship(name, build)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    _print_summary({"name": name, "path": str(path), "key": manifest["key"],
                    "dtype": manifest["dtype"], "files": len(manifest["files"]),
                    "mb": round(sum(manifest["sizes"].values()) / 2**20, 1)}, as_json)


@organism_app.command("eval")
def organism_eval(name: OrganismArg, as_json: JsonOpt = False,
                  recall_site: Annotated[bool, typer.Option(
                      "--recall-site/--no-recall-site",
                      help="Also run the averaged causal trace (issue 10; slower).")] = False):
    """Fact / paraphrase accuracy, memorized fraction by repeats, and (optionally) the recall
    site from causal tracing."""
    from memlens.missing import format_value
    from memlens.organisms.registry import ensure
    from memlens.studies.organism_report import evaluate_organism

    path = ensure(name, progress=not as_json)
    report = evaluate_organism(path, recall_site=recall_site)
    if as_json:
        print_json(report)
        return
    for k, v in report.items():
        console.print(f"{k}: {format_value(v)}")


def register(app: typer.Typer) -> None:
    app.add_typer(organism_app, name="organism")
