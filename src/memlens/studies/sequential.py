"""Sequential editing: T batches of B edits applied one after another to ONE model, measured
after every round (the AlphaEdit paper's Table 1 setting).

    cases = load_counterfact("organism:facts-gpt2")
    result = sequential_edits(handle, cases, batch_size=100, rounds=5,
                              methods=["memit", "alphaedit"], out_dir="seq/")
    result.rows()             # method × round → edits so far, ES, PS, NS, Score, GE, unrelated
    # seq/sequential.json (after every round), seq/sequential.png, seq/state-METHOD.pt

Each method (an editor of :mod:`memlens.edit.editors`, prepared once) edits the valid cases
[0, B), then [B, 2B), ... on top of its earlier rounds (ROME one request at a time, MEMIT and
AlphaEdit one batch, FT-L the batch at once; AlphaEdit's plan keeps the keys of its earlier
rounds). After round r it measures ES/PS/NS/Score on ALL r·B cases edited so far, GE on the
generations of the first ``ge_cases`` of them (0: skipped), and **unrelated**: of held-out
facts the unedited model knows (the last ``unrelated`` valid cases, never edited, whose true
object's first token is the model's top prediction), the fraction it still answers. When a
method has finished, all its edits are undone and the fingerprint checked (bit-exact).

**Resume: the edited weights are saved, not recomputed.** After each round the study writes
``state-METHOD.pt`` (the current values of every parameter the method changed, the round, and
AlphaEdit's accumulated K_pK_pᵀ) next to ``sequential.json``. A re-run with the same settings
reads both, loads the saved weights as one undoable edit (the originals snapshot first, so the
final undo is still bit-exact), restores AlphaEdit's state, and continues after the last
finished round. Re-applying earlier rounds would cost as much as running them again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memlens.errors import MemlensError
from memlens.evaluate.counterfact import CounterFactCase
from memlens.figures import finish_figure, pyplot
from memlens.ledger import EditHandle
from memlens.offload import read_tensor, write_tensor
from memlens.scoring import score_targets
from memlens.studies.scaling import _quality, valid_cases

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("ES", "PS", "NS", "Score", "GE", "unrelated")


@dataclass
class RoundPoint:
    """One method after ``round`` rounds: quality on every edit so far and on unrelated facts."""

    method: str
    round: int  # 1-based
    n_edits: int  # edits requested so far (round · batch size)
    ES: float
    PS: float
    NS: float
    Score: float
    GE: float  # NaN when ge_cases = 0
    unrelated: float  # fraction of the known held-out facts still answered
    seconds: float  # wall time of this round's editing
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SequentialResult:
    model: str
    batch_size: int
    rounds: int
    methods: list[str]
    points: list[RoundPoint]
    settings: dict[str, Any]

    def rows(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in asdict(p).items() if k != "extra"} for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "batch_size": self.batch_size, "rounds": self.rounds,
                "methods": self.methods, "points": [_json_safe(asdict(p)) for p in self.points],
                "settings": self.settings}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def known_facts(handle: Any, cases: Sequence[CounterFactCase]) -> list[CounterFactCase]:
    """The cases whose true object's first token the model predicts after the prompt."""
    scores = score_targets(handle, [c.request.text for c in cases],
                           [c.request.target_true for c in cases])
    return [c for c, s in zip(cases, scores, strict=True) if s.hits[0]]


def still_known(handle: Any, cases: Sequence[CounterFactCase]) -> float:
    """Fraction of ``cases`` whose true object is still the top next-token prediction."""
    if not cases:
        return float("nan")
    return len(known_facts(handle, cases)) / len(cases)


def sequential_edits(
    handle: Any,
    cases: Sequence[CounterFactCase],
    *,
    batch_size: int,
    rounds: int,
    methods: Sequence[str] = ("memit", "alphaedit"),
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    hparams: Mapping[str, Any] | None = None,
    corpus: str | None = None,
    ge_cases: int = 0,
    unrelated: int = 100,
    max_new_tokens: int = 30,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> SequentialResult:
    """ES/PS/NS/Score (GE) on all edits so far and the unrelated facts kept, after each of
    ``rounds`` batches of ``batch_size`` edits applied one after another, per method.

        result = sequential_edits(handle, cases, batch_size=10, rounds=3, out_dir="seq")
    """
    from memlens.edit.editors import get_editor

    if batch_size < 1 or rounds < 1:
        raise MemlensError(f"batch size and rounds must be ≥ 1, got {batch_size}, {rounds}")
    editors = [get_editor(m) for m in methods]
    pool, _ = valid_cases(handle, cases, batch_size * rounds + unrelated)
    if len(pool) < batch_size * rounds + min(unrelated, 1):
        raise MemlensError(f"{len(pool)} valid cases: too few for {rounds} rounds of "
                           f"{batch_size} and held-out facts; lower --rounds or --batch-size")
    edited, held_out = pool[:batch_size * rounds], pool[batch_size * rounds:]
    edited_subjects = {c.request.subject for c in edited}
    held_out = known_facts(handle, [c for c in held_out
                                    if c.request.subject not in edited_subjects])
    requests = [c.request for c in edited]
    plans = {e.name: e.prepare(handle, requests, layers=layer if e.one_layer else layers,
                               hparams=(hparams or {}).get(e.name), corpus=corpus,
                               progress=progress) for e in editors}
    settings = {"editors": {n: p.to_dict() for n, p in plans.items()}, "ge_cases": ge_cases,
                "unrelated_known": len(held_out), "fingerprint": handle.fingerprint(),
                "batch_size": batch_size, "cases": [c.case_id for c in edited]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                         ).hexdigest()[:16]
    settings["key"] = key
    out = None if out_dir is None else Path(out_dir)
    done = _read_done(out, key)
    points = [p for p in done if p.method in plans]
    fingerprint = handle.fingerprint()
    for name, plan in plans.items():
        finished = max((p.round for p in points if p.method == name), default=0)
        edits = _resume(handle, plan, out, name, key, finished) if finished else []
        try:
            for r in range(finished + 1, rounds + 1):
                batch = requests[(r - 1) * batch_size: r * batch_size]
                started = time.perf_counter()
                new, extra = plan.editor.apply(handle, batch, plan, check_current=False,
                                               skip_invalid=True, progress=progress)
                seconds = time.perf_counter() - started
                edits.extend(new)
                quality = _quality(handle, edited[:r * batch_size], ge_cases, max_new_tokens)
                point = RoundPoint(method=name, round=r, n_edits=r * batch_size, **quality,
                                   unrelated=still_known(handle, held_out),
                                   seconds=round(seconds, 3),
                                   extra={k: v for k, v in extra.items() if k != "z"})
                points.append(point)
                result = SequentialResult(handle.ref, batch_size, rounds, list(plans), points,
                                          settings)
                _save_round(handle, plan, out, name, key, r, edits, result)
                if progress:
                    print(f"{name:9s} round {r:3d} ({r * batch_size} edits)  " + "  ".join(
                        f"{m} {getattr(point, m):.3f}" for m in METRICS) + f"  {seconds:.1f}s")
        finally:
            for e in reversed(edits):
                e.undo(force=True)
        if handle.fingerprint(refresh=True) != fingerprint:
            raise MemlensError(f"weights differ after undoing the rounds of {name}")
    result = SequentialResult(handle.ref, batch_size, rounds, list(plans), points, settings)
    if out is not None:
        _write_json(out, result)
        plot_sequential(result, out / "sequential.png")
    return result


def _read_done(out: Path | None, key: str) -> list[RoundPoint]:
    path = None if out is None else out / "sequential.json"
    if path is None or not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data.get("settings", {}).get("key") != key:
        return []
    nan = float("nan")
    return [RoundPoint(**{k: nan if v is None else v for k, v in p.items()})
            for p in data["points"]]


def _write_json(out: Path, result: SequentialResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sequential.json.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    tmp.replace(out / "sequential.json")


def _save_round(handle: Any, plan: Any, out: Path | None, name: str, key: str, r: int,
                edits: list[EditHandle], result: SequentialResult) -> None:
    """The method's current weights (every parameter its edits changed) and AlphaEdit's keys,
    then the JSON: a round counts as finished only once both are written."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({n for e in edits for n in e.originals})
    kkt = _state_keys(handle, plan)
    blob = {"key": key, "round": r, "weights": {n: read_tensor(handle.model, n).cpu()
                                                for n in names}, "kkt": kkt}
    tmp = out / f"state-{name}.pt.tmp"
    torch.save(blob, tmp)
    tmp.replace(out / f"state-{name}.pt")
    _write_json(out, result)


def _state_keys(handle: Any, plan: Any) -> dict[int, torch.Tensor] | None:
    """AlphaEdit's accumulated K_pK_pᵀ per layer (None for other editors)."""
    if plan.state is None:
        return None
    layers = {layer for kkt in plan.state.live(handle) for layer in kkt}
    return {layer: sum(kkt[layer] for kkt in plan.state.live(handle) if layer in kkt)
            for layer in layers}


def _resume(handle: Any, plan: Any, out: Path | None, name: str, key: str, finished: int
            ) -> list[EditHandle]:
    """Load the weights saved after round ``finished`` as one undoable edit."""
    path = None if out is None else out / f"state-{name}.pt"
    if path is None or not path.is_file():
        raise MemlensError(f"{name}: sequential.json records {finished} round(s) but "
                           f"{path} is missing; delete sequential.json to start again")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob["key"] != key or blob["round"] != finished:
        raise MemlensError(f"{path} is of round {blob['round']} (other settings?); delete "
                           "the output directory to start again")
    edit = EditHandle.snapshot(handle, list(blob["weights"]), log={"method": f"{name} "
                               f"(rounds 1-{finished}, resumed)"})
    for n, value in blob["weights"].items():
        write_tensor(handle.model, n, value)  # offloaded weights into their weights maps
    edit.seal()
    if blob["kkt"] is not None:
        from memlens.edit.alphaedit import AlphaEditState

        plan.state = plan.state or AlphaEditState()
        plan.state.entries.append((edit, blob["kkt"]))
    return [edit]


def plot_sequential(result: SequentialResult, path: str | Path | None = None) -> Path | Figure:
    """ES, PS, NS, Score, GE and unrelated facts kept vs number of edits, one line per
    method."""
    shown = [m for m in METRICS if any(getattr(p, m) == getattr(p, m) for p in result.points)]
    fig, axes = pyplot().subplots(1, len(shown), figsize=(3.0 * len(shown), 3.0))
    for ax, metric in zip(axes, shown, strict=True):
        for method in result.methods:
            pts = sorted((p.n_edits, getattr(p, metric)) for p in result.points
                         if p.method == method)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
        ax.set_xlabel("edits so far")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sequential editing of {result.model}, batches of {result.batch_size}",
                 fontsize=10)
    fig.tight_layout()
    return finish_figure(fig, path)
