"""``memlens stats``: second moments of MLP keys (:mod:`memlens.stats`)."""

from __future__ import annotations

from typing import Annotated

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    console,
    print_json,
)


def stats(
    layers: Annotated[str, typer.Option("--layers", help="e.g. 3-8 or 2,5,7.")],
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Corpus samples (texts).")] = 1000,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per "
                                              "forward pass.")] = 2048,
    max_len: Annotated[int, typer.Option("--max-len", help="Tokens per sample (≤ context).")]
    = 256,
    pass_gib: Annotated[float, typer.Option(
        "--pass-gib", min=0.001, help="GiB of float64 sums one corpus pass may hold (each "
        "layer's about d_ff²·4 bytes): layers beyond it take more passes.")] = 0.5,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Second moments C = E(k kᵀ) of the MLP keys of many layers, cached; as few corpus passes
    as --pass-gib allows (one for every layer of a small model)."""
    from memlens.model import load_model
    from memlens.stats import layer_stats, parse_layers, stats_meta

    handle = load_model(model, device=device, dtype=dtype)
    result = layer_stats(handle, parse_layers(layers), corpus=corpus, n_samples=samples,
                         batch_tokens=batch_tokens, max_len=max_len, progress=not as_json,
                         max_pass_bytes=int(pass_gib * 2**30))
    rows = list(stats_meta(result).values())
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"key statistics: {model}")
    for column in ("layer", "tokens", "d_ff", "trace(C)", "corpus"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['count']:,}", str(r["d_ff"]), f"{r['trace']:.4g}",
                      r["corpus"])
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(stats)
