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
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    console,
    print_json,
)


def bench_edits_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    sizes: Annotated[str, typer.Option("--sizes", help="Numbers of edits, e.g. 1,10,100,1000.")]
    = "1,10,100,1000",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: memit, alphaedit, "
                                         "rome, ft-l, ft.")] = "memit,rome,ft-l",
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
    sequential: Annotated[bool, typer.Option("--sequential", help="Apply --rounds batches of "
                                             "--batch-size edits one after another to one "
                                             "model (ignores --sizes); sequential.json after "
                                             "every round, resumable.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Edits per round "
                                            "(--sequential).")] = 100,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds (--sequential).")] = 5,
    unrelated: Annotated[int, typer.Option("--unrelated", help="Held-out cases whose known "
                                           "facts measure 'unrelated' (--sequential).")] = 100,
    shuffle: Annotated[int | None, typer.Option("--shuffle", help="Take the cases in a random "
                                                "order drawn with this seed (default: the "
                                                "file's, relations in turn).")] = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Score/ES/PS/NS, GE and wall time vs number of edits for MEMIT, sequential ROME, FT-L;
    with --sequential, quality after each of T rounds of B edits on one model."""
    from memlens.evaluate import load_counterfact
    from memlens.evaluate.counterfact import resolve_data
    from memlens.missing import format_value
    from memlens.model import load_model
    from memlens.stats import parse_layers
    from memlens.studies.scaling import bench_edits, parse_sizes

    handle = load_model(model, device=device, dtype=dtype)
    cases = load_counterfact(resolve_data(data, handle), shuffle=shuffle)
    if sequential:
        _sequential(handle, cases, methods, batch_size, rounds, layers, layer, corpus, ge_cases,
                    unrelated, out, as_json)
        return
    size_list = parse_sizes(sizes)
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


def _sequential(handle, cases, methods: str, batch_size: int, rounds: int, layers: str | None,
                layer: int | None, corpus: str | None, ge_cases: int, unrelated: int,
                out: Path, as_json: bool) -> None:
    from memlens.stats import parse_layers
    from memlens.studies.sequential import METRICS, sequential_edits

    result = sequential_edits(handle, cases, batch_size=batch_size, rounds=rounds,
                              methods=[m.strip() for m in methods.split(",") if m.strip()],
                              layers=parse_layers(layers) if layers else None, layer=layer,
                              corpus=corpus, ge_cases=ge_cases, unrelated=unrelated,
                              out_dir=out, progress=not as_json)
    if as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"sequential editing of {handle.ref}, batches of {batch_size}")
    for column in ("method", "round", "edits", *METRICS, "seconds"):
        table.add_column(column, justify="right")
    for p in result.points:
        table.add_row(p.method, str(p.round), str(p.n_edits),
                      *(f"{getattr(p, m):.3f}" for m in METRICS), f"{p.seconds:.1f}")
    console.print(table)
    console.print(f"written: {out / 'sequential.json'}, {out / 'sequential.png'}")


def register(app: typer.Typer) -> None:
    app.command("bench-edits")(bench_edits_cmd)
