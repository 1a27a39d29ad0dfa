"""Did an edit take? Every editor measures its requests before and after changing weights.

    before = measure(handle, requests)             # before any weight changes
    ...                                            # the editor writes its update
    outcome = check_outcome(handle, requests, before, loss=(6.2, 0.04), loss_name="v* loss")
    outcome.took, outcome.reason                   # False, "1 of 1 request(s) did not take: …"

The rule (one request, prompt x = the request's rewrite prompt, P = exp(−mean-token NLL) of a
target after x, teacher forced, as in CounterFact's ES):

- **rose**: log P(target_new | x) rose by more than ``MIN_LOG_GAIN`` (1e-4 nats per token);
- **prefers new**: with target_true known, P(target_new | x) > P(target_true | x) after the
  edit (CounterFact's efficacy test); without it, target_new's first token is the model's top
  next-token prediction after x;
- a request took when both hold. The edit took when every request took AND the editor's own
  optimisation loss fell (last < first: the v* loss of ROME, the z loss of MEMIT — mean over
  facts —, the epoch loss of FT/FT-L). A loss that rose (seen on random-init models:
  6.2 → 32) is named in the reason even when the probabilities moved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from memlens.edit.requests import EditRequest

MIN_LOG_GAIN = 1e-4  # nats per target token: smaller rises count as "unchanged"
NAMED_IN_REASON = 3  # failed requests spelled out in the one-line reason


@dataclass
class RequestScores:
    """P(target_new) and P(target_true) after one request's rewrite prompt."""

    p_new: float  # exp(−mean NLL) of target_new
    p_true: float | None  # exp(−mean NLL) of target_true, when the request names it
    new_is_top: bool  # target_new's first token is the top next-token prediction


def measure(handle: Any, requests: Sequence[EditRequest]) -> list[RequestScores]:
    """Score every request's target_new (and target_true, if known) after its prompt."""
    from memlens.scoring import score_targets

    new = score_targets(handle, [r.text for r in requests], [r.target_new for r in requests])
    known = [i for i, r in enumerate(requests) if r.target_true]
    true = score_targets(handle, [requests[i].text for i in known],
                         [requests[i].target_true for i in known]) if known else []
    p_true = dict(zip(known, (s.prob for s in true), strict=True))
    return [RequestScores(p_new=s.prob, p_true=p_true.get(i), new_is_top=bool(s.hits[0]))
            for i, s in enumerate(new)]


@dataclass
class RequestOutcome:
    """One request before and after the edit, and whether it took (see the module rule)."""

    request: str  # "[Toulouse is a city in] -> [Japan]"
    p_new_before: float
    p_new_after: float
    p_true_before: float | None
    p_true_after: float | None
    rose: bool  # log P(target_new) rose by more than MIN_LOG_GAIN
    prefers_new: bool  # target_new beats target_true (or is the top next token) after the edit

    @property
    def took(self) -> bool:
        return self.rose and self.prefers_new

    def why_not(self) -> str:
        """What failed, with the numbers: "P(new) 0.0012 → 0.0012 (not increased)"."""
        parts = [f"P(new) {self.p_new_before:.3g} → {self.p_new_after:.3g}"
                 + ("" if self.rose else " (not increased)")]
        if not self.prefers_new:
            parts.append(f"P(true) {self.p_true_after:.3g} still higher"
                         if self.p_true_after is not None else "not the top next token")
        return f"{self.request}: " + ", ".join(parts)


@dataclass
class EditOutcome:
    """Whether an edit moved its requests, checked after the weights changed."""

    requests: list[RequestOutcome]
    loss_name: str | None = None  # "v* loss", "z loss", "FT loss"
    loss_first: float | None = None
    loss_last: float | None = None
    reasons: list[str] = field(default_factory=list)  # empty when the edit took

    @property
    def loss_fell(self) -> bool:
        """The optimisation loss decreased (True when the editor reports none)."""
        if self.loss_first is None or self.loss_last is None:
            return True
        return math.isfinite(self.loss_last) and self.loss_last < self.loss_first

    @property
    def took(self) -> bool:
        return all(r.took for r in self.requests) and self.loss_fell

    @property
    def n_took(self) -> int:
        return sum(r.took for r in self.requests)

    @property
    def reason(self) -> str:
        """One line: why the edit did not take ("" when it took)."""
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"took": self.took, "n_requests": len(self.requests), "n_took": self.n_took,
                "loss_name": self.loss_name, "loss_first": self.loss_first,
                "loss_last": self.loss_last, "loss_fell": self.loss_fell,
                "reason": self.reason,
                "requests": [{**asdict(r), "took": r.took} for r in self.requests]}


def check_outcome(handle: Any, requests: Sequence[EditRequest], before: list[RequestScores],
                  *, loss: tuple[float, float] | None = None,
                  loss_name: str | None = None) -> EditOutcome:
    """Measure ``requests`` again and compare with ``before`` (from :func:`measure`)."""
    after = measure(handle, requests)
    rows = []
    for request, b, a in zip(requests, before, after, strict=True):
        gain = _log(a.p_new) - _log(b.p_new)
        prefers = a.p_new > a.p_true if a.p_true is not None else a.new_is_top
        rows.append(RequestOutcome(request=request.describe(), p_new_before=b.p_new,
                                   p_new_after=a.p_new, p_true_before=b.p_true,
                                   p_true_after=a.p_true, rose=gain > MIN_LOG_GAIN,
                                   prefers_new=prefers))
    outcome = EditOutcome(rows, loss_name, *(loss or (None, None)))
    failed = [r for r in rows if not r.took]
    if failed:
        named = "; ".join(r.why_not() for r in failed[:NAMED_IN_REASON])
        more = f"; and {len(failed) - NAMED_IN_REASON} more" if len(failed) > NAMED_IN_REASON \
            else ""
        outcome.reasons.append(f"{len(failed)} of {len(rows)} request(s) did not take: "
                               f"{named}{more}")
    if not outcome.loss_fell:
        verb = "did not decrease" if outcome.loss_last == outcome.loss_first else "rose"
        outcome.reasons.append(f"the {loss_name or 'optimisation loss'} {verb} "
                               f"({outcome.loss_first:.3g} → {outcome.loss_last:.3g})")
    return outcome


def record_outcome(edit: Any, requests: Sequence[EditRequest], before: list[RequestScores],
                   losses: dict[str, Any], loss_name: str) -> Any:
    """Check ``edit`` (an :class:`~memlens.ledger.EditHandle` just applied) against
    ``before`` and store the outcome in ``edit.log["outcome"]``; returns ``edit``.
    ``losses`` holds the editor's ``loss_first`` and ``loss_last``."""
    outcome = check_outcome(edit.handle, requests, before, loss_name=loss_name,
                            loss=(float(losses["loss_first"]), float(losses["loss_last"])))
    edit.log["outcome"] = outcome.to_dict()
    return edit


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf
