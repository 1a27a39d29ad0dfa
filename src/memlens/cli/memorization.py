"""``memlens memorization scan|perturb|attribute|heads|unlearn|edit|all``: memorized paragraphs
(:mod:`memlens.memorization`, steps from :mod:`memlens.studies.memorization`).

Every command takes the ten options of ``SHARED`` (model, paragraphs, output, prefix and
suffix lengths, the MP / NMP thresholds) first, then its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import (
    AllowNoEffectOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    console,
    option,
    print_json,
    with_shared,
)

memorization_app = typer.Typer(help="Find, localize, unlearn and edit memorized paragraphs.",
                               no_args_is_help=True)

ParagraphsOpt = Annotated[str | None, typer.Option(
    "--corpus", "-c", help="Paragraphs: .jsonl (text or token_ids), .txt (blank-line separated), "
    "hf:NAME[:CONFIG[:SPLIT]]; default: the organism's paragraphs.jsonl.")]
PrefixOpt = Annotated[int, typer.Option("--prefix-len", help="Prompt tokens (paper: 50).")]
SuffixOpt = Annotated[int, typer.Option("--suffix-len", help="Tokens to reproduce (paper: 50).")]
MpOpt = Annotated[int | None, typer.Option("--mp-min-em",
                                           help="EM ≥ this is memorized (default: suffix).")]
NmpOpt = Annotated[int, typer.Option("--nmp-max-em", help="EM ≤ this is non-memorized.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use the first N paragraphs.")]
MaxOpt = Annotated[int, typer.Option("--max-paragraphs",
                                     help="MP (and NMP) paragraphs used beyond the scan.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Adam learning rate (paper: 1e-5; small "
                                      "organisms need ~1e-2).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps (reference: 5).")]
FracOpt = Annotated[float, typer.Option("--fraction", help="Share of weights in the mask.")]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay (paper: 1.0).")]
SaveOpt = Annotated[Path | None, typer.Option(
    "--save", help="Apply the sparse update and save the edited model to this NEW directory.")]

SHARED = [
    option("model", ModelOpt, "organism:facts-neo"), option("corpus", ParagraphsOpt, None),
    option("out", OutOpt, Path("memorization")), option("as_json", JsonOpt, False),
    option("device", DeviceOpt, None), option("dtype", DtypeOpt, None),
    option("prefix_len", PrefixOpt, 50),
    option("suffix_len", SuffixOpt, 50), option("mp_min_em", MpOpt, None),
    option("nmp_max_em", NmpOpt, 10), option("limit", LimitOpt, None),
]


def command(name: str):
    """Register ``fn(shared, **own)`` as `memlens memorization NAME`, with the ``SHARED``
    options first."""
    return lambda fn: memorization_app.command(name)(with_shared(SHARED)(fn))


def _inputs(shared, **settings):
    """Load the model and paragraphs; build the pipeline settings."""
    from memlens.memorization.data import load_paragraphs
    from memlens.model import load_model
    from memlens.studies.memorization import Settings

    handle = load_model(shared.model, device=shared.device, dtype=shared.dtype)
    paragraphs = load_paragraphs(handle, shared.corpus, prefix_len=shared.prefix_len,
                                 suffix_len=shared.suffix_len, limit=shared.limit)
    shared.out.mkdir(parents=True, exist_ok=True)
    return handle, paragraphs, Settings(prefix_len=shared.prefix_len, mp_min_em=shared.mp_min_em,
                                        nmp_max_em=shared.nmp_max_em,
                                        progress=not shared.as_json, **settings)


def _done(data: dict, out: Path, as_json: bool, title: str) -> None:
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{title}[/]")
    for key, value in data.items():
        console.print(f"  {key}: {value}")
    console.print(f"[green]results and figures:[/] {out}")


@command("scan")
def memorization_scan(shared):
    """Greedy exact match and suffix NLL of every paragraph; MP / NMP counts by repeats."""
    from memlens.studies.memorization import run_scan

    handle, paragraphs, s = _inputs(shared)
    result = run_scan(handle, paragraphs, shared.out, s)
    if shared.as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"memorization scan: {shared.model} ({len(paragraphs)} paragraphs)")
    columns = ("repeats", "n", "MP", "NMP", "between", "mean_em", "mean_nll")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result.table():
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)
    console.print(f"[green]results and figures:[/] {shared.out}")


@command("perturb")
def memorization_perturb(
    shared, max_paragraphs: MaxOpt = 32,
    mode: Annotated[str, typer.Option("--mode", help="model (2nd/1st choice) or random.")] = "model",
    seed: Annotated[int, typer.Option("--seed")] = 0,
):
    """Swap each prefix token of the memorized paragraphs; EM/NLL drop per position; PMPs."""
    from memlens.studies.memorization import run_perturb

    handle, paragraphs, s = _inputs(shared, max_mp=max_paragraphs, perturb_mode=mode, seed=seed)
    result = run_perturb(handle, paragraphs, shared.out, s)
    drop = result.em_drop.float().mean(0)
    _done({
        "paragraphs": len(result.ids), "mode": result.mode,
        "most_damaging_position": result.positions[int(drop.argmax())],
        "mean_em_drop_max": round(float(drop.max()), 2),
        "pmp_positions": result.pmp_position,
    }, shared.out, shared.as_json, f"token perturbation: {shared.model}")


@command("attribute")
def memorization_attribute(shared, max_paragraphs: MaxOpt = 32):
    """|∂NLL/∂θ| per layer, head (W_Q/K/V/O) and MLP matrix on MP vs NMP, and of the CO."""
    from memlens.studies.memorization import run_attribute

    handle, paragraphs, s = _inputs(shared, max_mp=max_paragraphs, max_nmp=max_paragraphs)
    result = run_attribute(handle, paragraphs, shared.out, s)
    if shared.as_json:
        print_json(result.to_dict())
        return
    diff = result.mp.values - result.nmp.values
    top = int(diff.flatten().argmax())
    share = {name: [round(float(v), 3) for v in part.layer_sum / part.layer_sum.sum()]
             for name, part in (("mp", result.mp), ("nmp", result.nmp))}
    _done({
        "layer_share_mp": share["mp"], "layer_share_nmp": share["nmp"],
        "largest MP − NMP": f"layer {top // diff.shape[1]} {result.columns[top % diff.shape[1]]}",
    }, shared.out, False, f"gradient attribution: {shared.model}")


@command("heads")
def memorization_heads(shared, max_paragraphs: MaxOpt = 32):
    """Attention to rare prefix tokens per head (Kendall τ vs corpus frequency); KQ heatmap."""
    from memlens.studies.memorization import run_heads

    handle, paragraphs, s = _inputs(shared, max_mp=max_paragraphs)
    result = run_heads(handle, paragraphs, shared.out, s)
    data = result.to_dict()
    _done(data if shared.as_json else {
        "candidate memorization head": f"layer {result.candidate[0]} head {result.candidate[1]}",
        "tau": round(data["candidate_tau"], 3), "rare_mass": round(data["candidate_rare_mass"], 3),
    }, shared.out, shared.as_json, f"memorization heads: {shared.model}")


def _update(mode: str, shared, max_paragraphs: int, lr: float, steps: int, fraction: float,
            weight_decay: float, save: Path | None, allow_no_effect: bool) -> None:
    """``unlearn`` or ``edit``: the sparse update against its random-mask and full-FT controls;
    ``save`` keeps the sparse one (unless it did not take and not ``allow_no_effect``)."""
    from memlens.memorization.sparse import save_model
    from memlens.studies.memorization import run_updates

    handle, paragraphs, s = _inputs(shared, max_mp=max_paragraphs, max_nmp=max_paragraphs,
                                    lr=lr, steps=steps, fraction=fraction,
                                    weight_decay=weight_decay)
    results = run_updates(handle, paragraphs, shared.out, s, mode=mode,
                          keep="sparse" if save else None)
    data = {r.method: {"before": r.before, "after": r.after, "n_weights": r.mask.n_selected,
                       "took": r.took} for r in results}
    if save:
        sparse = next(r for r in results if r.method == "sparse")
        if not sparse.took and not allow_no_effect:
            from memlens.errors import EditDidNotTake

            sparse.edit.undo()
            raise EditDidNotTake(f"the edit did not take: {sparse.why_not()}; nothing was saved "
                                 "(raise --lr/--steps, or pass --allow-no-effect to save anyway)")
        data["saved"] = str(save_model(handle, save, sparse.edit))
        sparse.edit.undo()
    if shared.as_json:
        print_json(data)
        return
    _print_updates(results, f"memorization {mode}: {shared.model} (lr {lr}, {steps} steps)")
    if save:
        console.print(f"[green]edited model saved:[/] {data['saved']}")
    console.print(f"[green]results and figures:[/] {shared.out}")


def _print_updates(results, title: str) -> None:
    from rich.table import Table

    keys = [k for k in ("mp_em", "mp_nll", "nmp_em", "nmp_nll", "target_em", "perplexity")
            if k in results[0].before]
    table = Table(title=title)
    table.add_column("method")
    table.add_column("weights", justify="right")
    for k in keys:
        table.add_column(f"{k} before → after", justify="right")
    for r in results:
        table.add_row(r.method, f"{r.mask.n_selected:,}",
                      *(f"{r.before[k]:.2f} → {r.after[k]:.2f}" for k in keys))
    console.print(table)


def _update_command(mode: str, doc: str):
    """The command ``memlens memorization MODE`` (``unlearn`` or ``edit``: same options)."""

    def update(
        shared, max_paragraphs: MaxOpt = 32, lr: LrOpt = 1e-5, steps: StepsOpt = 5,
        fraction: FracOpt = 0.001, weight_decay: WdOpt = 1.0, save: SaveOpt = None,
        allow_no_effect: AllowNoEffectOpt = False,
    ):
        _update(mode, shared, max_paragraphs, lr, steps, fraction, weight_decay, save,
                allow_no_effect)

    update.__name__, update.__doc__ = f"memorization_{mode}", doc
    return command(mode)(update)


memorization_unlearn = _update_command(
    "unlearn", "Unlearn memorized paragraphs (CO: keep − change): sparse vs random mask vs "
    "full FT.")
memorization_edit = _update_command(
    "edit", "Edit memorized paragraphs towards their perturbed continuations (CO: keep + PMP "
    "NLL).")


@command("all")
def memorization_all(
    shared, max_paragraphs: MaxOpt = 32, lr: LrOpt = 1e-2, steps: StepsOpt = 10,
    fraction: FracOpt = 0.001, weight_decay: WdOpt = 1.0,
):
    """Scan, perturb, attribute, heads, unlearn and edit in one run; writes summary.json.

    Defaults for the update (lr 1e-2, 10 steps) suit the small organisms; GPT-Neo 125M
    follows the paper with --lr 1e-5 --steps 5."""
    from memlens.studies.memorization import run_all

    handle, paragraphs, s = _inputs(shared, max_mp=max_paragraphs, max_nmp=max_paragraphs,
                                    lr=lr, steps=steps, fraction=fraction,
                                    weight_decay=weight_decay)
    summary = run_all(handle, paragraphs, shared.out, s)
    if shared.as_json:
        print_json(summary)
        return
    scan = summary["scan"]
    console.print(f"[bold]memorization: {shared.model}[/] — {scan['n_mp']} MP, "
                  f"{scan['n_nmp']} NMP of {scan['n_paragraphs']}")
    for row in scan["table"]:
        console.print(f"  repeats {row['repeats']}: {row['MP']} MP / {row['NMP']} NMP "
                      f"(mean EM {row['mean_em']})")
    head = summary["heads"]["candidate"]
    console.print(f"  candidate memorization head: layer {head['layer']} head {head['head']}")
    for mode in ("unlearn", "edit"):
        for method, r in summary[mode].items():
            console.print(f"  {mode} {method}: MP EM {r['before']['mp_em']:.1f} → "
                          f"{r['after']['mp_em']:.1f}, NMP EM {r['before']['nmp_em']:.1f} → "
                          f"{r['after']['nmp_em']:.1f}")
    console.print(f"[green]summary:[/] {shared.out / 'summary.json'}")


def register(app: typer.Typer) -> None:
    app.add_typer(memorization_app, name="memorization")
