"""``memlens edit rome|memit|alphaedit|ft|ft-l``: one editor each, checked before and after
(:mod:`memlens.edit`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memlens.cli.options import (
    DEFAULT_MODEL,
    AllowNoEffectOpt,
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    HParamsOpt,
    JsonOpt,
    LayerOpt,
    ModelOpt,
    SkipInvalidOpt,
    StatsDirOpt,
    console,
    print_json,
)
from memlens.errors import MemlensError

edit_app = typer.Typer(help="Edit facts: ROME, MEMIT, AlphaEdit, fine-tuning baselines.",
                       no_args_is_help=True)

RequestsOpt = Annotated[Path, typer.Option("--requests", help="JSON/JSONL: flat requests "
                                           "{prompt, subject, target_new} or CounterFact records.")]
SaveOpt = Annotated[Path | None, typer.Option("--save", help="New directory for the edited model.")]
NOpt = Annotated[int | None, typer.Option("--n", help="Only the first N requests.")]


def _save_if_took(handle, edit, result: dict, save: Path | None, allow_no_effect: bool) -> None:
    """Save the edited model to ``save`` unless the edit did not take (then nothing is written,
    unless ``allow_no_effect``); records ``took`` and ``saved`` in ``result``."""
    from memlens.edit import save_edited

    result["took"] = edit.took
    if save is not None and (edit.took is not False or allow_no_effect):
        result["saved"] = str(save_edited(handle, save, edit))


def _finish_edit(edit, result: dict, save: Path | None, allow_no_effect: bool,
                 as_json: bool) -> None:
    """Print ``result`` as JSON (or where the model was saved), then raise EditDidNotTake (one
    line, non-zero exit) when the edit did not take, after undoing it; with
    ``allow_no_effect`` print a warning instead."""
    from memlens.errors import EditDidNotTake

    if as_json:
        print_json(result)
    elif "saved" in result:
        console.print(f"  saved: {result['saved']}")
    elif save is None:
        console.print("  (not saved: pass --save DIR to keep the edited model)")
    if edit.took is not False:
        return
    reason = edit.log["outcome"]["reason"]
    if allow_no_effect:
        if not as_json:
            console.print(f"[yellow]warning: the edit did not take ({reason}); kept because of "
                          "--allow-no-effect[/]")
        return
    edit.undo()
    raise EditDidNotTake(f"the edit did not take: {reason}; nothing was saved (pass "
                         "--allow-no-effect to keep it anyway)")


def _published_stats(directory: Path | None, handle):
    """--stats-dir: the reference-layout statistics found there (read when needed), or None."""
    if directory is None:
        return None
    from memlens.stats_io import ReferenceStatsDir

    return ReferenceStatsDir(directory, handle)


def _print_fact_check(handle, request, title: str, show: bool = True) -> dict:
    """P(target_new), P(target_true) (``missing(reason)`` without a target_true) and the
    greedy answer for one request, printed when ``show``."""
    from memlens.edit.requests import greedy_answer
    from memlens.missing import format_value, missing
    from memlens.scoring import score_targets

    targets = [request.target_new] + ([request.target_true] if request.target_true else [])
    scores = score_targets(handle, [request.text] * len(targets), targets)
    answer = handle.tokenizer.decode(greedy_answer(handle, request.text, 3))
    row = {"p_new": scores[0].prob, "p_true": scores[1].prob if len(scores) > 1 else
           missing("the request gives no target_true"), "greedy": answer}
    if show:
        console.print(f"  {title:6s} p(new) {row['p_new']:.3g}, p(true) "
                      f"{format_value(row['p_true'], 3)}; greedy: {answer!r}")
    return row


@edit_app.command("rome")
def edit_rome(
    request_file: Annotated[Path, typer.Option("--request", help="JSON: {prompt, subject, "
                                               "target_new} or a CounterFact record.")],
    model: ModelOpt = DEFAULT_MODEL,
    layer: LayerOpt = None,
    update: Annotated[str | None, typer.Option(
        "--update", help="Which keys the rank-one update inserts: mean (k* averaged over "
        "contexts), legacy (the reference code's bare-prompt key), both (δ at k* and at the "
        "bare key). Default: the model's hparams.")] = None,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    stats_dir: StatsDirOpt = None,
    save: Annotated[Path | None, typer.Option("--save", help="New directory for the edited "
                                              "model.")] = None,
    allow_no_effect: AllowNoEffectOpt = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """One ROME edit, evaluated before and after; --save writes the edited model."""
    from memlens.edit import ROMEHyperParams, apply_rome, load_requests
    from memlens.model import load_model

    requests = load_requests(request_file)
    if len(requests) != 1:
        raise MemlensError(f"{request_file} holds {len(requests)} requests; ROME edits one "
                           "(use `memlens edit memit` for many)")
    request = requests[0]
    handle = load_model(model, device=device, dtype=dtype)
    hp = ROMEHyperParams.for_model(handle, path=hparams_file, update=update)
    if not as_json:
        console.print(f"[bold]ROME[/] {request.describe()}")
    before = _print_fact_check(handle, request, "before", show=not as_json)
    edit = apply_rome(handle, request, layer=layer, hparams=hp, corpus=corpus,
                      stats=_published_stats(stats_dir, handle), progress=not as_json)
    after = _print_fact_check(handle, request, "after", show=not as_json)
    result = {**edit.to_dict(), "before": before, "after": after}
    _save_if_took(handle, edit, result, save, allow_no_effect)
    if not as_json:
        v_star = edit.log["v_star"]
        console.print(f"  layer {edit.layer} ({edit.log['layer_source']}), ‖ΔW‖ "
                      f"{edit.delta_norms[edit.layer]:.4g}, v* loss "
                      f"{v_star['loss_first']:.3g} → {v_star['loss_last']:.3g}, P(target_new) "
                      f"{v_star['prob_before']:.3g} → {v_star['prob_after']:.3g}")
    _finish_edit(edit, result, save, allow_no_effect, as_json)


def _batch_check(handle, requests) -> dict:
    """Over many requests: mean P(target_new) and, where target_true is known, the share with
    P(new) > P(true) (efficacy; ``missing(reason)`` when no request gives target_true)."""
    from memlens.missing import missing
    from memlens.scoring import score_targets

    new = score_targets(handle, [r.text for r in requests], [r.target_new for r in requests])
    known = [(i, r) for i, r in enumerate(requests) if r.target_true]
    true = score_targets(handle, [r.text for _, r in known], [r.target_true for _, r in known]) \
        if known else []
    wins = [new[i].nll < t.nll for (i, _), t in zip(known, true, strict=True)]
    return {"p_new": sum(s.prob for s in new) / len(new),
            "efficacy": sum(wins) / len(wins) if wins else missing(
                "no request gives target_true to compare P(target_new) with")}


def _report_batch_edit(handle, edit, requests, before: dict, save: Path | None, as_json: bool,
                       detail: str, allow_no_effect: bool) -> None:
    from memlens.missing import format_value

    after = _batch_check(handle, requests)
    result = {**edit.to_dict(), "before": before, "after": after}
    _save_if_took(handle, edit, result, save, allow_no_effect)
    if not as_json:
        for title, row in (("before", before), ("after", after)):
            console.print(f"  {title:6s} mean p(new) {row['p_new']:.3g}, efficacy "
                          f"{format_value(row['efficacy'], 3)}")
        console.print(f"  {detail}; ‖ΔW‖ " + ", ".join(f"L{k} {v:.4g}"
                                                      for k, v in edit.delta_norms.items()))
    _finish_edit(edit, result, save, allow_no_effect, as_json)


def _first_requests(request_file: Path, n: int | None) -> list:
    """The first ``n`` requests of ``request_file`` (all when ``n`` is None); ``n`` ≥ 1."""
    from memlens.edit import load_requests

    requests = load_requests(request_file)
    if n is not None and n < 1:
        raise MemlensError(f"--n must be ≥ 1, got {n}")
    return requests[:n]


@edit_app.command("memit")
def edit_memit(
    request_file: RequestsOpt,
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str | None, typer.Option("--layers", help="Band R, e.g. 1-3 (default: "
                                               "from a causal trace, else a middle band).")]
    = None,
    n: NOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Edits per sequential "
                                                   "MEMIT batch (default: all at once).")] = None,
    skip_invalid: SkipInvalidOpt = False,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    stats_dir: StatsDirOpt = None,
    save: SaveOpt = None,
    allow_no_effect: AllowNoEffectOpt = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Many edits at once with MEMIT, evaluated before and after; --save writes the model."""
    from memlens.edit.memit import MEMITHyperParams, apply_memit
    from memlens.model import load_model
    from memlens.stats import parse_layers

    requests = _first_requests(request_file, n)
    handle = load_model(model, device=device, dtype=dtype)
    hp = MEMITHyperParams.for_model(handle, path=hparams_file, batch_size=batch_size)
    if not as_json:
        console.print(f"[bold]MEMIT[/] {len(requests)} request(s), e.g. {requests[0].describe()}")
    before = _batch_check(handle, requests)
    edit = apply_memit(handle, requests, layers=parse_layers(layers) if layers else None,
                       hparams=hp, corpus=corpus, stats=_published_stats(stats_dir, handle),
                       skip_invalid=skip_invalid, progress=not as_json)
    z = edit.log["z"]
    _report_batch_edit(handle, edit, requests, before, save, as_json,
                       f"layers {edit.layers} ({edit.log['layer_source']}), z: P(new) "
                       f"{z['prob_before']:.3g} → {z['prob_after']:.3g}, "
                       f"{len(edit.log['skipped'])} skipped, {edit.log['seconds']:.1f}s",
                       allow_no_effect)


@edit_app.command("alphaedit")
def edit_alphaedit(
    request_file: RequestsOpt,
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str | None, typer.Option("--layers", help="Band R, e.g. 1-3 (default: "
                                               "as MEMIT chooses it).")] = None,
    n: NOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Edits per sequential "
                                                   "batch; later batches keep the keys of "
                                                   "earlier ones (default: all at once).")]
    = None,
    threshold: Annotated[float | None, typer.Option("--nullspace-threshold", help="Eigenvalues "
                                                    "of C below this span the null space "
                                                    "(default 2e-2, the reference's).")]
    = None,
    skip_invalid: SkipInvalidOpt = False,
    hparams_file: HParamsOpt = None,
    corpus: CorpusOpt = None,
    stats_dir: StatsDirOpt = None,
    save: SaveOpt = None,
    allow_no_effect: AllowNoEffectOpt = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """Many edits at once with AlphaEdit (MEMIT projected onto the preserved keys' null
    space), evaluated before and after; --save writes the model."""
    from memlens.edit.alphaedit import AlphaEditHyperParams, apply_alphaedit
    from memlens.model import load_model
    from memlens.stats import parse_layers

    requests = _first_requests(request_file, n)
    handle = load_model(model, device=device, dtype=dtype)
    hp = AlphaEditHyperParams.for_model(handle, path=hparams_file, batch_size=batch_size,
                                        nullspace_threshold=threshold)
    if not as_json:
        console.print(f"[bold]AlphaEdit[/] {len(requests)} request(s), e.g. "
                      f"{requests[0].describe()}")
    before = _batch_check(handle, requests)
    edit = apply_alphaedit(handle, requests, layers=parse_layers(layers) if layers else None,
                           hparams=hp, corpus=corpus, stats=_published_stats(stats_dir, handle),
                           skip_invalid=skip_invalid, progress=not as_json)
    z = edit.log["z"]
    null = ", ".join(f"{k}: {v['dim']}/{v['d_ff']}" for k, v in edit.log["nullspace"].items())
    _report_batch_edit(handle, edit, requests, before, save, as_json,
                       f"layers {edit.layers} ({edit.log['layer_source']}), null space "
                       f"{null}, z: P(new) {z['prob_before']:.3g} → {z['prob_after']:.3g}, "
                       f"{len(edit.log['skipped'])} skipped, {edit.log['seconds']:.1f}s",
                       allow_no_effect)


def _edit_ft(kind: str, request_file: Path, model: str, layer: int | None, n: int | None,
             hparams_file: Path | None, save: Path | None, as_json: bool,
             device: str | None, allow_no_effect: bool, dtype: str | None = None) -> None:
    from memlens.edit.finetune import FTHyperParams, apply_ft
    from memlens.model import load_model

    requests = _first_requests(request_file, n)
    handle = load_model(model, device=device, dtype=dtype)
    hp = FTHyperParams.constrained(handle, path=hparams_file) if kind == "ft-l" else \
        FTHyperParams.for_model(handle, path=hparams_file)
    if not as_json:
        console.print(f"[bold]{kind.upper()}[/] {len(requests)} request(s), e.g. "
                      f"{requests[0].describe()}")
    before = _batch_check(handle, requests)
    edit = apply_ft(handle, requests, layer=layer, hparams=hp, progress=not as_json)
    _report_batch_edit(handle, edit, requests, before, save, as_json,
                       f"layer {edit.layer} ({edit.log['layer_source']}), loss "
                       f"{edit.log['loss_first']:.3g} → {edit.log['loss_last']:.3g}, "
                       f"max |ΔW| {edit.log['max_abs_change']:.3g}", allow_no_effect)


def _ft_command(kind: str, doc: str):
    """The command ``memlens edit KIND`` (``ft`` or ``ft-l``: same options)."""

    def command(request_file: RequestsOpt, model: ModelOpt = DEFAULT_MODEL,
                layer: LayerOpt = None, n: NOpt = None, hparams_file: HParamsOpt = None,
                save: SaveOpt = None, allow_no_effect: AllowNoEffectOpt = False,
                as_json: JsonOpt = False, device: DeviceOpt = None, dtype: DtypeOpt = None):
        _edit_ft(kind, request_file, model, layer, n, hparams_file, save, as_json, device,
                 allow_no_effect, dtype)

    command.__name__, command.__doc__ = f"edit_{kind.replace('-', '_')}", doc
    return edit_app.command(kind)(command)


edit_ft = _ft_command("ft", "Baseline FT: fine-tune one layer's MLP output matrix on the "
                      "requests.")
edit_ft_l = _ft_command("ft-l", "Baseline FT-L: FT with |W − W₀| ≤ ε (5e-4 unless --hparams "
                        "sets norm_constraint).")


def register(app: typer.Typer) -> None:
    app.add_typer(edit_app, name="edit")
