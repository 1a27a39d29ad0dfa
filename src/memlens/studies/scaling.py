"""The scaling curve of the MEMIT paper (Fig. 5): editing quality vs number of edits, per method.

    cases = load_counterfact("organism:facts-gpt2")
    result = bench_edits(handle, cases, sizes=[1, 10, 100, 1000], out_dir="bench/")
    result.table()             # method × n → ES, PS, NS, Score, GE, seconds
    # bench/scaling.json, bench/scaling.png (Score, ES, PS, NS, GE vs n edits, log x)

For each size n, the first n valid CounterFact cases are edited TOGETHER by each method (an
editor of :mod:`memlens.edit.editors`) — MEMIT in one batch, ROME one after another (each edit
on top of the previous ones), FT-L on all n requests at once — then ES/PS/NS/Score are measured
on all n cases and GE on the first ``ge_cases`` of them, the wall time of the editing is
recorded, and every edit is undone (bit-exact) before the next point. Each editor is prepared
once (its layers, statistics and context templates: ``Editor.prepare``). Each finished point is appended to ``points.jsonl`` in ``out_dir``;
a re-run with the same settings skips the points already there (resume after an interrupt).

A metric no edited case can give (GE with ``ge_cases=0`` or without generation prompts, NS
without neighbourhood prompts, ...) stays NaN on the points (the plot leaves a gap) and is
written ``{"value": null, "reason": ...}`` (:mod:`memlens.missing`) by ``to_dict``, ``table``
and the progress lines; the reasons come from the valid cases actually edited at each n.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memlens.edit.requests import validate_request
from memlens.errors import MemlensError
from memlens.evaluate.counterfact import (
    CounterFactCase,
    bench_reasons,
    case_metrics,
    explain_metrics,
    summarize,
)
from memlens.evaluate.fluency import ngram_entropy
from memlens.figures import finish_figure, pyplot
from memlens.missing import format_value
from memlens.scoring import generate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("Score", "ES", "PS", "NS", "GE")


@dataclass
class ScalingPoint:
    """Quality of one method after n edits made together."""

    method: str
    n: int  # edits requested
    n_edited: int  # edits made (ROME may skip a request that became invalid)
    ES: float
    PS: float
    NS: float
    Score: float
    GE: float  # on the first ge_cases cases (NaN when none: see ScalingResult.reasons)
    seconds: float  # wall time of the editing (not of the evaluation)
    extra: dict[str, Any] = field(default_factory=dict)  # layers, z summary, skipped, ...


@dataclass
class ScalingResult:
    """All points, the unedited model's numbers at each n, and the settings (JSON via to_dict).

    ``points`` and ``pre`` hold NaN where a metric cannot be computed; ``to_dict`` and
    ``table`` put ``missing(reason)`` there, the reason taken from ``reasons``.
    """

    model: str
    sizes: list[int]
    methods: list[str]
    points: list[ScalingPoint]
    pre: dict[int, dict[str, float]]  # n → ES/PS/NS/Score/GE of the unedited model
    settings: dict[str, Any]
    reasons: dict[int, dict[str, str]] = field(default_factory=dict)  # n → {metric: why none}

    def explained(self, n: int, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (a point's or ``pre[n]``'s metrics) with NaN metrics as missing(reason)."""
        return explain_metrics(values, METRICS, self.reasons.get(n, {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``scaling.json``); settings left unset (None: chosen at run time, as
        ``layers``/``layer`` record, or unused by the methods run) are left out."""
        return {"model": self.model, "sizes": self.sizes, "methods": self.methods,
                "points": [self.explained(p.n, asdict(p)) for p in self.points],
                "pre": {str(n): self.explained(n, v) for n, v in self.pre.items()},
                "settings": _set_only(self.settings)}

    def table(self) -> list[dict[str, Any]]:
        """One row per (method, n): the metrics (missing(reason) where none) and the seconds."""
        return [self.explained(p.n, {"method": p.method, "n": p.n,
                                     **{m: getattr(p, m) for m in METRICS},
                                     "seconds": p.seconds}) for p in self.points]


def _set_only(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without its None values, at any depth."""
    return {k: _set_only(v) if isinstance(v, dict) else v
            for k, v in settings.items() if v is not None}


def parse_sizes(spec: str) -> list[int]:
    """ "1,10,100,1000" → [1, 10, 100, 1000] (sorted, distinct, positive)."""
    try:
        sizes = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise MemlensError(f"cannot parse sizes {spec!r}; use e.g. 1,10,100,1000") from None
    if not sizes or sizes[0] < 1:
        raise MemlensError(f"sizes must be positive integers, got {spec!r}")
    return sizes


def valid_cases(handle: Any, cases: Sequence[CounterFactCase], n: int
                ) -> tuple[list[CounterFactCase], list[dict[str, Any]]]:
    """The first ``n`` cases whose request is valid for this model (subject found, target_new
    not already the model's answer), and why the others were skipped."""
    kept, skipped = [], []
    for case in cases:
        if len(kept) >= n:
            break
        try:
            validate_request(handle, case.request)
            kept.append(case)
        except MemlensError as exc:
            skipped.append({"case_id": case.case_id, "reason": str(exc)})
    return kept, skipped


def _quality(handle: Any, cases: Sequence[CounterFactCase], ge_cases: int, max_new_tokens: int
             ) -> dict[str, float]:
    """Mean ES/PS/NS (+Score) over ``cases`` and GE over the first ``ge_cases``."""
    records = [case_metrics(handle, c, generation=None) for c in cases]
    out = summarize(records)
    prompts = [p for c in cases[:ge_cases] for p in c.generation_prompts]
    if prompts:
        texts = generate(handle, prompts, max_new_tokens=max_new_tokens, sample=True, seed=0)
        out["GE"] = ngram_entropy(texts)
    return {k: out[k] for k in ("ES", "PS", "NS", "Score", "GE")}


def bench_edits(
    handle: Any,
    cases: Sequence[CounterFactCase],
    sizes: Sequence[int],
    *,
    methods: Sequence[str] = ("memit", "rome", "ft-l"),
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    hparams: Mapping[str, Any] | None = None,
    corpus: str | None = None,
    ge_cases: int = 20,
    max_new_tokens: int = 30,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> ScalingResult:
    """ES/PS/NS/Score, GE and edit wall time of each method at each number of edits.

    ``methods`` are editor names (:data:`memlens.edit.editors.EDITORS`). ``layers`` is the
    band of band editors (MEMIT) and ``layer`` the single layer of one-layer editors (ROME,
    FT, FT-L); each editor chooses its own when they are None, as it does alone.
    ``hparams`` maps a method to its hyper-parameters (default: the editor's for this model).
    With ``out_dir``, writes scaling.json and scaling.png and resumes from points.jsonl.

        result = bench_edits(handle, load_counterfact(path), [1, 10, 100], out_dir="bench")
    """
    from memlens.edit.editors import get_editor

    editors = [get_editor(m) for m in methods]
    sizes = sorted({int(s) for s in sizes})
    chosen, skipped = valid_cases(handle, cases, sizes[-1])
    if not chosen:
        raise MemlensError("no valid CounterFact case for this model: "
                           f"{skipped[0]['reason'] if skipped else 'no cases given'}")
    if len(chosen) < sizes[-1]:
        sizes = sorted({min(s, len(chosen)) for s in sizes})
    requests = [c.request for c in chosen]
    plans = {e.name: e.prepare(handle, requests, layers=layer if e.one_layer else layers,
                               hparams=(hparams or {}).get(e.name), corpus=corpus,
                               progress=progress) for e in editors}
    settings = {"editors": {name: plan.to_dict() for name, plan in plans.items()},
                "ge_cases": ge_cases, "max_new_tokens": max_new_tokens,
                "n_cases_skipped": len(skipped), "fingerprint": handle.fingerprint()}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                         ).hexdigest()[:16]
    done = _read_points(out_dir, key)
    reasons = {n: bench_reasons(chosen, n, ge_cases) for n in sizes}
    pre: dict[int, dict[str, float]] = {}
    for n in sizes:
        if ("pre", n) in done:
            pre[n] = done[("pre", n)]
        else:
            pre[n] = _quality(handle, chosen[:n], ge_cases, max_new_tokens)
            _append_point(out_dir, key, "pre", n, pre[n])
    points: list[ScalingPoint] = []
    for name, plan in plans.items():
        for n in sizes:
            record = done.get((name, n))
            if record is None:
                record = _edit_and_measure(handle, plan, chosen[:n], ge_cases, max_new_tokens,
                                           progress)
                _append_point(out_dir, key, name, n, record)
            points.append(ScalingPoint(method=name, n=n, **record))
            if progress:
                shown = explain_metrics(record, METRICS, reasons[n])
                print(f"{name:6s} n={n:5d}  " + "  ".join(
                    f"{m} {format_value(shown[m], 3)}" for m in METRICS)
                    + f"  {record['seconds']:.1f}s")
    result = ScalingResult(model=handle.ref, sizes=list(sizes), methods=list(plans),
                           points=points, pre=pre, settings=settings, reasons=reasons)
    if out_dir is not None:
        out = Path(out_dir)
        (out / "scaling.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
        plot_scaling(result, out / "scaling.png")
    return result


def _edit_and_measure(handle: Any, plan: Any, cases: Sequence[CounterFactCase], ge_cases: int,
                      max_new_tokens: int, progress: bool) -> dict[str, Any]:
    """Edit ``cases`` together as ``plan`` says, time it, measure the quality, undo (checked
    bit-exact by the fingerprint); the point's record."""
    fingerprint = handle.fingerprint()
    started = time.perf_counter()
    edits, extra = plan.editor.apply(handle, [c.request for c in cases], plan,
                                     check_current=False, skip_invalid=True, progress=progress)
    seconds = time.perf_counter() - started
    try:
        metrics = _quality(handle, cases, ge_cases, max_new_tokens)
    finally:
        for e in reversed(edits):
            e.undo()
    if handle.fingerprint(refresh=True) != fingerprint:
        raise MemlensError(f"weights differ after undoing {plan.editor.name} at n={len(cases)}")
    return {"n_edited": len(cases) - len(extra.get("skipped", [])), **metrics,
            "seconds": round(seconds, 3), "extra": extra}


def _read_points(out_dir: str | Path | None, key: str) -> dict[tuple[str, int], dict[str, Any]]:
    if out_dir is None or not (Path(out_dir) / "points.jsonl").is_file():
        return {}
    done = {}
    for line in (Path(out_dir) / "points.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interrupt: measure that point again
            continue
        if record.get("key") == key:
            done[(record["method"], int(record["n"]))] = record["result"]
    return done


def _append_point(out_dir: str | Path | None, key: str, method: str, n: int,
                  result: dict[str, Any]) -> None:
    if out_dir is None:
        return
    path = Path(out_dir) / "points.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"key": key, "method": method, "n": n, "result": result},
                           default=str) + "\n")


def plot_scaling(result: ScalingResult, path: str | Path | None = None) -> Path | Figure:
    """Score, ES, PS, NS and GE vs number of edits (log x), one line per method, the unedited
    model dashed — the layout of the MEMIT paper's Fig. 5. Without ``path``: the Figure."""
    fig, axes = pyplot().subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.0))
    for ax, metric in zip(axes, METRICS, strict=True):
        for method in result.methods:
            pts = sorted((p.n, getattr(p, metric)) for p in result.points if p.method == method)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method.upper())
        ns = sorted(result.pre)
        ax.plot(ns, [result.pre[n][metric] for n in ns], "k--", lw=1, label="unedited")
        ax.set_xscale("log")
        ax.set_xlabel("number of edits")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Editing {result.model}: quality vs number of edits", fontsize=10)
    fig.tight_layout()
    return finish_figure(fig, path)
