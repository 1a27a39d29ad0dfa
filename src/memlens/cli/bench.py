"""``memlens bench-edits``: editing quality vs number of edits (:mod:`memlens.studies.scaling`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    CorpusOpt,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    console,
    print_json,
)


def bench_edits_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    sizes: Annotated[str, typer.Option("--sizes", help="Numbers of edits, e.g. 1,10,100,1000.")]
    = "1,10,100,1000",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: memit, rome, ft-l, "
                                         "ft.")] = "memit,rome,ft-l",
    data: DataOpt = None,
    layers: Annotated[str | None, typer.Option("--layers", help="MEMIT band R, e.g. 1-3.")]
    = None,
    layer: Annotated[int | None, typer.Option("--layer", help="Layer of ROME and FT-L.")] = None,
    ge_cases: Annotated[int, typer.Option("--ge-cases", help="Cases whose generations give "
                                          "GE.")] = 20,
    corpus: CorpusOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for scaling.json, "
                                      "scaling.png and the resumable points.jsonl.")]
    = Path("bench-edits"),
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
):
    """Score/ES/PS/NS, GE and wall time vs number of edits for MEMIT, sequential ROME, FT-L."""
    from memlens.evaluate import load_counterfact
    from memlens.evaluate.counterfact import resolve_data
    from memlens.missing import format_value
    from memlens.model import load_model
    from memlens.stats import parse_layers
    from memlens.studies.scaling import bench_edits, parse_sizes

    handle = load_model(model, device=device)
    size_list = parse_sizes(sizes)
    cases = load_counterfact(resolve_data(data, handle))
    result = bench_edits(handle, cases, size_list,
                         methods=[m.strip() for m in methods.split(",") if m.strip()],
                         layers=parse_layers(layers) if layers else None, layer=layer,
                         corpus=corpus, ge_cases=ge_cases, out_dir=out, progress=not as_json)
    if as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"editing {model}: quality vs number of edits")
    for column in ("method", "n", "Score", "ES", "PS", "NS", "GE", "seconds"):
        table.add_column(column, justify="right")
    for row in [result.explained(n, {"method": "unedited", "n": n, **result.pre[n],
                                     "seconds": ""}) for n in result.sizes] + result.table():
        table.add_row(row["method"], str(row["n"]), *(format_value(row[k], 3) for k in
                      ("Score", "ES", "PS", "NS", "GE")), format_value(row["seconds"], 3))
    console.print(table)
    console.print(f"written: {out / 'scaling.json'}, {out / 'scaling.png'}")


def register(app: typer.Typer) -> None:
    app.command("bench-edits")(bench_edits_cmd)
