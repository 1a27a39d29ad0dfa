"""``memlens eval counterfact``: ES/PS/NS, fluency and consistency, before and after editing
(:mod:`memlens.evaluate`, editors from :mod:`memlens.edit.editors`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    CorpusOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    HParamsOpt,
    JsonOpt,
    LayerOpt,
    ModelOpt,
    console,
    print_json,
)

eval_app = typer.Typer(help="Evaluate a model or an editor (CounterFact, zsRE).",
                       no_args_is_help=True)

@eval_app.command("counterfact")
def eval_counterfact(
    model: ModelOpt = DEFAULT_MODEL,
    data: DataOpt = None,
    edit: Annotated[str, typer.Option("--edit", help="rome, memit, alphaedit, ft, ft-l or "
                                      "none.")] = "none",
    n: Annotated[int | None, typer.Option("--n", help="First N cases.")] = None,
    layer: LayerOpt = None,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    references: Annotated[Path | None, typer.Option("--references", help="reference_texts.json "
                                                    "or a corpus, for RS.")] = None,
    generation: Annotated[bool, typer.Option("--generation/--no-generation",
                                             help="Generate text for GE and RS.")] = True,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens")] = 50,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write counterfact.json "
                                             "(all cases) here.")] = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """ES/PS/NS (+EM/PM/NM), Score, GE, RS before and after editing each case alone."""
    from memlens.evaluate import (
        GenerationConfig,
        ReferenceTexts,
        evaluate_counterfact,
        load_counterfact,
    )
    from memlens.evaluate.counterfact import resolve_data
    from memlens.missing import format_value
    from memlens.model import load_model

    handle = load_model(model, device=device, dtype=dtype)
    path = resolve_data(data, handle)
    cases = load_counterfact(path, n=n)
    refs = ReferenceTexts.load(references) if references else ReferenceTexts.for_data(handle, path)
    hp = None
    if edit != "none" and hparams_file is not None:
        from memlens.edit.editors import get_editor

        hp = get_editor(edit).hparams(handle, path=hparams_file)
    result = evaluate_counterfact(
        handle, cases, editor=edit, layer=layer, hparams=hp, corpus=corpus, references=refs,
        generation=GenerationConfig(max_new_tokens=gen_tokens) if generation else None,
        progress=not as_json,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "counterfact.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    if as_json:
        print_json(result.summary)
        return
    from rich.table import Table

    where = result.extra.get("layer", result.extra.get("layers"))
    table = Table(title=f"CounterFact: {model}, {len(result.cases)} cases, editor {edit}"
                  + (f" (layer {where})" if where is not None else ""))
    for column in ("metric", "pre", "post"):
        table.add_column(column, justify="right")
    for key, value in {**result.summary, "ACC": result.extra["ACC"]}.items():
        table.add_row(key, format_value(value["pre"]), format_value(value["post"]))
    console.print(table)
    if result.extra["skipped"]:
        console.print(f"skipped {len(result.extra['skipped'])} case(s); first: "
                      f"{result.extra['skipped'][0]['reason']}")


@eval_app.command("zsre")
def eval_zsre(
    data: Annotated[Path, typer.Option("--data", help="zsRE evaluation JSON as published "
                                       "(zsre_mem_eval.json).")],
    model: ModelOpt = DEFAULT_MODEL,
    edit: Annotated[str, typer.Option("--edit", help="rome, memit, alphaedit, ft, ft-l or "
                                      "none.")] = "none",
    n: Annotated[int | None, typer.Option("--n", help="First N cases.")] = None,
    layer: LayerOpt = None,
    corpus: CorpusOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """zsRE efficacy, paraphrase and specificity (token accuracy) before and after editing
    each case alone."""
    from memlens.evaluate.zsre import evaluate_zsre, load_zsre
    from memlens.missing import format_value
    from memlens.model import load_model

    handle = load_model(model, device=device, dtype=dtype)
    result = evaluate_zsre(handle, load_zsre(data, n=n), editor=edit, layer=layer,
                           corpus=corpus, progress=not as_json)
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title=f"zsRE: {model}, {result['pre']['n']} cases, editor {edit}")
    for column in ("metric", "pre", "post"):
        table.add_column(column, justify="right")
    for key in ("efficacy", "paraphrase", "specificity"):
        table.add_row(key, format_value(result["pre"][key]), format_value(result["post"][key]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
