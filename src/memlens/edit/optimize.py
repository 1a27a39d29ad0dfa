"""Per-fact vectors δ_i added to one activation at each fact's token, optimised for MANY facts in
one batch: MEMIT's z_i (residual stream of the top edited layer) and, as the one-fact case,
ROME's v* (MLP output).

    objective = DeltaObjective.from_hparams(hparams)
    result = optimize_deltas(handle, "blocks.4.hook_resid_post", requests, targets, templates,
                             init=h0, objective=objective)
    z = result.target                     # (n_facts, d_model) = h0 + δ

For fact i with prompts x_ij (context template j around its prompt), target tokens y_i and
initial vector h_i (the activation being edited, at the bare prompt's fact token):

    L_i(δ_i) = mean_j NLL(y_i | x_ij, h + δ_i at the fact token)
               + kl_factor · KL(edited ‖ original) of the next-token distribution of
                 kl_prompt ("{subject} is a") at its fact token
               + weight_decay · ‖δ_i‖ / ‖h_i‖²,          ‖δ_i‖ ≤ clamp_norm_factor · ‖h_i‖,

minimised with Adam, at most ``steps`` forward passes, stopping at L_i < stop_loss (the loss is
read before each update, as in the reference ``compute_z``). Facts are independent: δ_i touches
only its own rows, so ∂(Σ_k L_k)/∂δ_i = ∂L_i/∂δ_i, and Adam works per coordinate; one batched run
therefore gives the δ_i that one-at-a-time runs give (up to float rounding). A fact that stops is
frozen and its rows leave the batch.

Nothing below the edited point and nothing before the fact token depends on δ, so by default
each step runs only the blocks from the point up over the tokens from the fact token on
(:class:`memlens.edit.passes.SuffixPasses`; the rest is computed once and cached);
``suffix_only=False`` runs the whole model each step, as the reference does
(:class:`~memlens.edit.passes.FullPasses`). Suffix passes also leave out what no loss reads:
the KL prompts run in a pass of their own cut after the fact token (one column each instead
of the template rows' width), facts are grouped by suffix width (no padding), and the last
block's MLP runs only at the columns that predict target tokens; with fused GELU and eager
attention on CPU (:func:`~memlens.edit.passes.fast_kernels`) the results differ from the
reference loop's by float rounding only (tests/test_optimize.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memlens.edit.compute import fact_position, templated_prompts
from memlens.edit.passes import FullPasses, SuffixPasses
from memlens.edit.requests import EditRequest
from memlens.errors import MemlensError, NumericalError


@dataclass(frozen=True)
class DeltaObjective:
    """Settings of the δ optimisation (defaults: the MEMIT reference's gpt2-xl/gpt-j values)."""

    lr: float = 0.5  # Adam learning rate
    steps: int = 20  # at most this many forward passes (steps − 1 updates)
    stop_loss: float = 0.05  # a fact stops once its loss falls below this
    weight_decay: float = 0.5  # weight of ‖δ‖ / ‖h‖²
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor · ‖h‖
    kl_factor: float = 0.0625  # weight of KL(edited ‖ original) on kl_prompt
    kl_prompt: str = "{} is a"  # essence prompt whose distribution must not drift
    fact_token: str = "subject_last"  # where δ is added in every prompt

    @classmethod
    def from_hparams(cls, hp: Any) -> DeltaObjective:
        """From any editor's hyper-parameters that use the reference names (v_lr, ...)."""
        return cls(lr=hp.v_lr, steps=hp.v_num_grad_steps, stop_loss=hp.v_stop_loss,
                   weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                   kl_factor=hp.kl_factor, kl_prompt=hp.kl_prompt, fact_token=hp.fact_token)


@dataclass
class DeltaResult:
    """Optimised δ_i of n facts and how the optimisation went, per fact."""

    delta: torch.Tensor  # (n, d) δ, float32
    init: torch.Tensor  # (n, d) h, the activation before editing
    steps: list[int] = field(default_factory=list)  # forward passes used per fact
    loss_first: list[float] = field(default_factory=list)  # L_i at δ = 0
    loss_last: list[float] = field(default_factory=list)  # L_i at the final δ
    prob_before: list[float] = field(default_factory=list)  # exp(−NLL_i) at δ = 0
    prob_after: list[float] = field(default_factory=list)  # exp(−NLL_i) at the final δ

    @property
    def target(self) -> torch.Tensor:
        """z = h + δ, (n, d)."""
        return self.init + self.delta

    def summary(self) -> dict[str, float]:
        """Means over facts (JSON-ready)."""
        def mean(xs: Sequence[float]) -> float:
            return float(sum(xs) / len(xs)) if xs else float("nan")

        return {"n": len(self.steps), "steps": mean(self.steps),
                "loss_first": mean(self.loss_first), "loss_last": mean(self.loss_last),
                "prob_before": mean(self.prob_before), "prob_after": mean(self.prob_after),
                "delta_norm": float(self.delta.norm(dim=1).mean()) if len(self.steps) else 0.0,
                "init_norm": float(self.init.norm(dim=1).mean()) if len(self.steps) else 0.0}


@dataclass
class _Fact:
    """Token rows of one fact: its templated prompts (+ target[:-1]) and its KL prompt."""

    rows: list[list[int]]
    lookups: list[int]  # fact-token position per row
    labels: list[tuple[int, int, int]]  # (row, position predicting, token id)
    kl_row: list[int]
    kl_lookup: int


def _fact_rows(tok: Any, request: EditRequest, target: Sequence[int], templates: Sequence[str],
               objective: DeltaObjective) -> _Fact:
    rows, lookups, labels = [], [], []
    for r, prompt in enumerate(templated_prompts(request, templates)):
        ids = tok(prompt.format(request.subject), add_special_tokens=True)["input_ids"]
        labels.extend((r, len(ids) - 1 + j, t) for j, t in enumerate(target))
        rows.append(ids + list(target[:-1]))
        lookups.append(fact_position(tok, prompt, request.subject, objective.fact_token))
    kl_lookup = fact_position(tok, objective.kl_prompt, request.subject, objective.fact_token)
    kl_row = tok(objective.kl_prompt.format(request.subject), add_special_tokens=True)["input_ids"]
    return _Fact(rows, lookups, labels, kl_row, kl_lookup)


def _merged(facts: Sequence[_Fact]) -> _Fact:
    """One fact whose δ serves several requests about the same subject (MEMIT-Merge): their
    rows and labels side by side, and one KL row (the subject's, the same for all)."""
    rows: list[list[int]] = []
    lookups: list[int] = []
    labels: list[tuple[int, int, int]] = []
    for fact in facts:
        labels.extend((len(rows) + r, pos, t) for r, pos, t in fact.labels)
        rows.extend(fact.rows)
        lookups.extend(fact.lookups)
    return _Fact(rows, lookups, labels, facts[0].kl_row, facts[0].kl_lookup)


def _chunks(facts: list[_Fact], max_batch_tokens: int, suffix_only: bool) -> list[list[int]]:
    """Fact indices grouped so that rows × widest row ≤ max_batch_tokens (a fact's KL prompt
    counted as one more row), facts taken in order of the width a pass pads them to (the
    suffix from the fact token, or the whole row); suffix passes also start a new group where
    that width changes, so that each pads (almost) nothing."""
    def width(fact: _Fact) -> int:
        return max(len(r) - (p if suffix_only else 0)
                   for r, p in zip(fact.rows, fact.lookups, strict=True))

    groups: list[list[int]] = []
    current: list[int] = []
    n_rows = widest = 0
    for i in sorted(range(len(facts)), key=lambda i: width(facts[i])):
        fact = facts[i]
        w = max(widest, max(len(r) for r in fact.rows))
        if current and ((n_rows + len(fact.rows) + 1) * w > max_batch_tokens or
                        suffix_only and width(fact) != width(facts[current[-1]])):
            groups.append(current)
            current, n_rows, w = [], 0, max(len(r) for r in fact.rows)
        current.append(i)
        n_rows += len(fact.rows) + 1
        widest = w
    if current:
        groups.append(current)
    return groups


def optimize_deltas(
    handle: Any,
    point: str,
    requests: Sequence[EditRequest],
    targets: Sequence[Sequence[int]],
    templates: Sequence[str],
    init: torch.Tensor,
    objective: DeltaObjective = DeltaObjective(),
    *,
    max_batch_tokens: int = 4096,
    suffix_only: bool = True,
    progress: bool = False,
    groups: Sequence[Sequence[int]] | None = None,
) -> DeltaResult:
    """Optimise δ_i for every request in batches of whole facts (see module docstring).

    ``point`` is the hook name where δ is added (e.g. ``blocks.L.hook_resid_post`` for MEMIT,
    ``blocks.L.hook_mlp_out`` for ROME); ``init`` (n, d) holds h_i, the activation there at the
    bare prompt's fact token (it sets the clamp radius and the decay scale). ``targets[i]`` are
    the token ids of requests[i].target_new as they follow its prompt. Facts are packed into
    forward passes of at most ``max_batch_tokens`` padded tokens; ``max_batch_tokens=0`` puts
    each fact alone (the one-after-another reference loop). ``suffix_only`` runs only what δ
    can change (blocks from the point's up, positions from the fact token on; see
    :class:`SuffixPasses`); ``False`` runs the whole model each step, as the reference does.
    ``groups`` (lists of request indices, e.g. the requests about one subject) makes each
    group share one δ that minimises the mean NLL of all its targets' tokens; ``init`` and the
    result then have one row per group.

        z = optimize_deltas(handle, "blocks.3.hook_resid_post", reqs, ids, ["{}"], h0).target
    """
    groups = [[i] for i in range(len(requests))] if groups is None else \
        [list(g) for g in groups]
    n = len(groups)
    if len(requests) != len(targets) or n != init.shape[0]:
        raise MemlensError(f"{len(requests)} requests, {len(targets)} targets, {n} groups and "
                           f"{init.shape[0]} initial vectors: requests and targets must match, "
                           "and there is one initial vector per group")
    if sorted(i for g in groups for i in g) != list(range(len(requests))):
        raise MemlensError("groups must hold every request index exactly once")
    if "{}" not in objective.kl_prompt:
        raise MemlensError(f"kl_prompt {objective.kl_prompt!r} needs '{{}}' for the subject")
    tok = handle.tokenizer
    single = [_fact_rows(tok, r, t, templates, objective)
              for r, t in zip(requests, targets, strict=True)]
    facts = [single[g[0]] if len(g) == 1 else _merged([single[i] for i in g]) for g in groups]
    result = DeltaResult(delta=torch.zeros_like(init, dtype=torch.float32),
                         init=init.detach().float().clone(),
                         steps=[0] * n, loss_first=[0.0] * n, loss_last=[0.0] * n,
                         prob_before=[0.0] * n, prob_after=[0.0] * n)
    passes = [[i] for i in range(n)] if max_batch_tokens <= 0 else \
        _chunks(facts, max_batch_tokens, suffix_only)
    model = handle.model
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    bar = None
    if progress:
        from memlens.stats import ProgressBar

        bar = ProgressBar(f"z/v* of {n} facts", n, 0)
    try:
        for batch in passes:
            _optimize_group(handle, point, [facts[i] for i in batch], batch, result, objective,
                            suffix_only)
            if bar:
                for _ in batch:
                    bar.advance()
    finally:
        if bar:
            bar.close()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    if not torch.isfinite(result.delta).all():
        raise NumericalError("the optimised δ (z/v*) contains NaN/inf; no weights were changed")
    return result


@dataclass
class _Layout:
    """Where the pieces of one batch of facts sit: the template rows are the facts' rows one
    after another, then the KL rows, one per fact (in a pass of their own when ``kl_apart``);
    every index is a tensor."""

    fact_of_row: torch.Tensor  # (template rows,) the fact each template row belongs to
    kl_column: torch.Tensor  # (facts,) where the output holds each KL prompt's fact token
    target_row: torch.Tensor  # (targets,) for each target token: the row predicting it,
    target_column: torch.Tensor  # (targets,) the column of the pass's output that predicts it,
    target_token: torch.Tensor  # (targets,) its id,
    target_fact: torch.Tensor  # (targets,) and the fact it belongs to

    @classmethod
    def of(cls, facts: list[_Fact], passes: FullPasses | SuffixPasses,
           kl_passes: FullPasses | SuffixPasses | None) -> _Layout:
        fact_of_row, targets = [], []
        for f, fact in enumerate(facts):
            targets += [(len(fact_of_row) + r, position, token, f)
                        for r, position, token in fact.labels]
            fact_of_row += [f] * len(fact.rows)
        kl_rows = torch.arange(len(facts)) + (0 if kl_passes else len(fact_of_row))
        row, position, token, fact_index = torch.tensor(targets).unbind(1)
        return cls(torch.tensor(fact_of_row),
                   (kl_passes or passes).column(kl_rows,
                                                torch.tensor([f.kl_lookup for f in facts])),
                   row, passes.column(row, position), token, fact_index)


@dataclass
class _Step:
    """The rows a step runs: those of the facts still optimising (``active``)."""

    facts: torch.Tensor  # indices of the active facts (= their KL rows' among the KL rows)
    rows: torch.Tensor  # template rows of the active facts, in order
    position: torch.Tensor  # (all rows,) a row's index among ``rows`` (−1: not run)
    targets: torch.Tensor  # bool (targets,): the target tokens of active facts
    read: tuple[torch.Tensor, torch.Tensor]  # (row, column) of the output predicting them

    @classmethod
    def of(cls, layout: _Layout, active: torch.Tensor) -> _Step:
        rows = active[layout.fact_of_row].nonzero().squeeze(1)
        position = torch.full((len(layout.fact_of_row),), -1, dtype=torch.long)
        position[rows] = torch.arange(len(rows))
        targets = active[layout.target_fact]
        return cls(active.nonzero().squeeze(1), rows, position, targets,
                   (position[layout.target_row[targets]], layout.target_column[targets]))


def _optimize_group(handle: Any, point: str, facts: list[_Fact], index: list[int],
                    result: DeltaResult, objective: DeltaObjective, suffix_only: bool) -> None:
    """Optimise the δ of the facts ``index`` (one batch, see the module docstring) into
    ``result``: every step runs the rows of the facts still active, each fact stops on its
    own (its last δ is kept in ``final``), and the rest step on.

    Suffix passes run the KL prompts apart, cut after the fact token (a causal model's output
    there does not depend on later tokens): one column each instead of the template rows'
    width. Whole-model passes run them with the template rows, as the reference does."""
    device = handle.device
    rows = [r for f in facts for r in f.rows]
    lookups = [p for f in facts for p in f.lookups]
    kl_lookups = [f.kl_lookup for f in facts]
    if suffix_only:
        passes = SuffixPasses(handle, point, rows, lookups)
        kl_passes = SuffixPasses(handle, point, [f.kl_row[:f.kl_lookup + 1] for f in facts],
                                 kl_lookups)
    else:
        passes = FullPasses(handle, point, rows + [f.kl_row for f in facts],
                            lookups + kl_lookups)
        kl_passes = None
    layout = _Layout.of(facts, passes, kl_passes)
    h = result.init[index].to(device)  # (m, d)
    h_norm = h.norm(dim=1)
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=objective.lr)
    active = torch.ones(len(facts), dtype=torch.bool)
    final = torch.zeros_like(h)  # δ of each fact as it was when the fact stopped
    kl_reference: torch.Tensor | None = None  # KL-prompt log-probs before any update
    unembed = handle.arch.unembedding(handle.model)
    now = _Step.of(layout, active)
    for step in range(objective.steps):
        optimizer.zero_grad()
        on = now.facts.to(device)
        if kl_passes is None:  # one pass: the template rows, then the KL rows
            run = torch.cat([now.rows, len(layout.fact_of_row) + now.facts])
            out = passes.run(run, _adding(delta, torch.cat([layout.fact_of_row[now.rows],
                                                            now.facts]).to(device),
                                          passes.fact_column(run).to(device)))
            hidden, kl_hidden = out[:len(now.rows)], out[len(now.rows):]
        else:
            hidden = passes.run(now.rows, _adding(delta, layout.fact_of_row[now.rows].to(device),
                                                  passes.fact_column(now.rows).to(device)),
                                read=now.read)
            kl_hidden = kl_passes.run(now.facts, _adding(
                delta, on, kl_passes.fact_column(now.facts).to(device)))
        nll = _target_nll(hidden, unembed, layout, now, len(facts), device)
        kl_log_probs = torch.log_softmax(unembed(kl_hidden[
            torch.arange(len(on), device=device), layout.kl_column[now.facts].to(device)]
        ).float(), dim=-1)
        if kl_reference is None:
            kl_reference = kl_log_probs.detach().clone()  # step 0: every fact is active
        kl = torch.zeros(len(facts), device=device).index_put(
            (on,), (kl_log_probs.exp() * (kl_log_probs - kl_reference[on])).sum(-1))
        decay = objective.weight_decay * delta.norm(dim=1) / h_norm ** 2
        loss = nll + objective.kl_factor * kl + decay  # (m,); meaningful for active facts
        loss_now = loss.detach().cpu()
        _record(result, index, now.facts, step, loss_now, (-nll.detach()).exp().cpu())
        stop = (loss_now < objective.stop_loss) | (step == objective.steps - 1)
        stopping = active & stop
        if stopping.any():
            final[stopping.to(device)] = delta.detach()[stopping.to(device)]
            active &= ~stop
            if not active.any():
                break
            now = _Step.of(layout, active)
        loss[active.to(device)].sum().backward()
        optimizer.step()
        _hold_and_clamp(delta, final, ~active.to(device), objective.clamp_norm_factor * h_norm)
    result.delta[index] = final.cpu().float()


def _adding(delta: torch.Tensor, fact_of_row: torch.Tensor, fact_column: torch.Tensor):
    """Hook fn adding each run row's fact's δ at that row's fact-token column."""
    rows = torch.arange(len(fact_of_row), device=fact_of_row.device)

    def add(out: torch.Tensor) -> torch.Tensor:
        return out.index_put((rows, fact_column), delta[fact_of_row].to(out.dtype),
                             accumulate=True)

    return add


def _target_nll(hidden: torch.Tensor, unembed: Any, layout: _Layout, now: _Step, n_facts: int,
                device: torch.device) -> torch.Tensor:
    """NLL_i per fact: mean over fact i's target tokens (every prompt of a fact has the same
    target), 0 for facts no longer active."""
    row = now.position[layout.target_row[now.targets]].to(device)
    column = layout.target_column[now.targets].to(device)
    token = layout.target_token[now.targets].to(device)
    fact = layout.target_fact[now.targets].to(device)
    logits = unembed(hidden[row, column]).float()
    token_log_prob = torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1)
    nll_sum = torch.zeros(n_facts, device=device).index_add(0, fact, -token_log_prob)
    count = torch.zeros(n_facts, device=device).index_add(0, fact,
                                                          torch.ones_like(token_log_prob))
    return nll_sum / count.clamp(min=1)


def _record(result: DeltaResult, index: list[int], facts_on: torch.Tensor, step: int,
            loss: torch.Tensor, prob: torch.Tensor) -> None:
    """Write the active facts' loss and P(target) at ``step`` into ``result``."""
    for f in facts_on.tolist():
        i = index[f]
        if step == 0:
            result.loss_first[i], result.prob_before[i] = float(loss[f]), float(prob[f])
        result.loss_last[i], result.prob_after[i] = float(loss[f]), float(prob[f])
        result.steps[i] = step + 1


@torch.no_grad()
def _hold_and_clamp(delta: torch.Tensor, final: torch.Tensor, stopped: torch.Tensor,
                    max_norm: torch.Tensor) -> None:
    """Put the stopped facts' δ back (Adam's momentum must not move them) and clamp every δ
    to ‖δ‖ ≤ ``max_norm``."""
    delta[stopped] = final[stopped]
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12),
                        torch.ones_like(norms))
    delta.mul_(scale[:, None])
