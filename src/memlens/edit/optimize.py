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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memlens import hooks
from memlens.edit.compute import fact_position, templated_prompts
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
    """Token rows of one fact: its templated prompts (+ target[:-1]) and the KL prompt last."""

    rows: list[list[int]]
    lookups: list[int]  # fact-token position per row
    labels: list[tuple[int, int, int]]  # (row, position predicting, token id)


def _fact_rows(tok: Any, request: EditRequest, target: Sequence[int], templates: Sequence[str],
               objective: DeltaObjective) -> _Fact:
    rows, lookups, labels = [], [], []
    for r, prompt in enumerate(templated_prompts(request, templates)):
        ids = tok(prompt.format(request.subject), add_special_tokens=True)["input_ids"]
        labels.extend((r, len(ids) - 1 + j, t) for j, t in enumerate(target))
        rows.append(ids + list(target[:-1]))
        lookups.append(fact_position(tok, prompt, request.subject, objective.fact_token))
    rows.append(tok(objective.kl_prompt.format(request.subject),
                    add_special_tokens=True)["input_ids"])
    lookups.append(fact_position(tok, objective.kl_prompt, request.subject,
                                 objective.fact_token))
    return _Fact(rows, lookups, labels)


def _chunks(facts: list[_Fact], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive fact indices grouped so that rows × widest row ≤ max_batch_tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    n_rows = width = 0
    for i, fact in enumerate(facts):
        w = max(width, max(len(r) for r in fact.rows))
        if current and (n_rows + len(fact.rows)) * w > max_batch_tokens:
            groups.append(current)
            current, n_rows, w = [], 0, max(len(r) for r in fact.rows)
        current.append(i)
        n_rows += len(fact.rows)
        width = w
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
    max_batch_tokens: int = 16384,
    progress: bool = False,
) -> DeltaResult:
    """Optimise δ_i for every request in batches of whole facts (see module docstring).

    ``point`` is the hook name where δ is added (e.g. ``blocks.L.hook_resid_post`` for MEMIT,
    ``blocks.L.hook_mlp_out`` for ROME); ``init`` (n, d) holds h_i, the activation there at the
    bare prompt's fact token (it sets the clamp radius and the decay scale). ``targets[i]`` are
    the token ids of requests[i].target_new as they follow its prompt. Facts are packed into
    forward passes of at most ``max_batch_tokens`` padded tokens; ``max_batch_tokens=0`` puts
    each fact alone (the one-after-another reference loop).

        z = optimize_deltas(handle, "blocks.3.hook_resid_post", reqs, ids, ["{}"], h0).target
    """
    n = len(requests)
    if not (n == len(targets) == init.shape[0]):
        raise MemlensError(f"{n} requests, {len(targets)} targets and {init.shape[0]} initial "
                           "vectors: they must match")
    if "{}" not in objective.kl_prompt:
        raise MemlensError(f"kl_prompt {objective.kl_prompt!r} needs '{{}}' for the subject")
    tok = handle.tokenizer
    facts = [_fact_rows(tok, r, t, templates, objective)
             for r, t in zip(requests, targets, strict=True)]
    result = DeltaResult(delta=torch.zeros_like(init, dtype=torch.float32),
                         init=init.detach().float().clone(),
                         steps=[0] * n, loss_first=[0.0] * n, loss_last=[0.0] * n,
                         prob_before=[0.0] * n, prob_after=[0.0] * n)
    groups = [[i] for i in range(n)] if max_batch_tokens <= 0 else \
        _chunks(facts, max_batch_tokens)
    model = handle.model
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    bar = None
    if progress:
        from memlens.stats import ProgressBar

        bar = ProgressBar(f"z/v* of {n} facts", n, 0)
    try:
        for group in groups:
            _optimize_group(handle, point, [facts[i] for i in group], group, result, objective)
            if bar:
                for _ in group:
                    bar.advance()
    finally:
        if bar:
            bar.close()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    if not torch.isfinite(result.delta).all():
        raise NumericalError("the optimised δ (z/v*) contains NaN/inf; no weights were changed")
    return result


def _optimize_group(handle: Any, point: str, facts: list[_Fact], index: list[int],
                    result: DeltaResult, objective: DeltaObjective) -> None:
    """Optimise the δ of the facts ``index`` (one batch) into ``result``."""
    device = handle.device
    tok = handle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [r for f in facts for r in f.rows]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
    row_fact, row_lookup, kl_rows, labels = [], [], [], []
    offset = 0
    for f, fact in enumerate(facts):
        row_fact += [f] * len(fact.rows)
        row_lookup += fact.lookups
        kl_rows.append(offset + len(fact.rows) - 1)
        labels += [(offset + r, pos, t, f) for r, pos, t in fact.labels]
        offset += len(fact.rows)
    row_fact_t = torch.tensor(row_fact)
    row_lookup_t = torch.tensor(row_lookup)
    kl_rows_t = torch.tensor(kl_rows)
    lab = torch.tensor(labels)  # (n_labels, 4): row, position, token, fact
    m = len(facts)
    h = result.init[index].to(device)  # (m, d)
    h_norm = h.norm(dim=1)
    max_norm = objective.clamp_norm_factor * h_norm
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=objective.lr)
    active = torch.ones(m, dtype=torch.bool)
    final = torch.zeros_like(h)
    kl_init: torch.Tensor | None = None

    for step in range(objective.steps):
        facts_on = active.nonzero().squeeze(1)
        row_on = active[row_fact_t].nonzero().squeeze(1)  # rows of active facts
        remap = torch.full((len(rows),), -1, dtype=torch.long)
        remap[row_on] = torch.arange(len(row_on))
        lab_on = lab[active[lab[:, 3]]]
        rows_idx = torch.arange(len(row_on), device=device)
        look_idx = row_lookup_t[row_on].to(device)
        fact_of_row = row_fact_t[row_on].to(device)

        def add_delta(out: torch.Tensor, rows_idx=rows_idx, look_idx=look_idx,
                      fact_of_row=fact_of_row) -> torch.Tensor:
            return out.index_put((rows_idx, look_idx), delta[fact_of_row].to(out.dtype),
                                 accumulate=True)

        optimizer.zero_grad()
        with hooks.edit(handle.model, point, add_delta):
            # the body only; the unembedding runs at the few positions the loss reads
            hidden = handle.model.base_model(
                input_ids=input_ids[row_on].to(device),
                attention_mask=attention[row_on].to(device)).last_hidden_state
        unembed = handle.arch.unembedding(handle.model)
        # NLL_i: mean over fact i's label tokens (each prompt has the same target length)
        picked = unembed(hidden[remap[lab_on[:, 0]].to(device), lab_on[:, 1].to(device)]).float()
        token_lp = torch.log_softmax(picked, dim=-1).gather(
            1, lab_on[:, 2, None].to(device)).squeeze(1)
        lab_fact = lab_on[:, 3].to(device)
        nll_sum = torch.zeros(m, device=device).index_add(0, lab_fact, -token_lp)
        count = torch.zeros(m, device=device).index_add(0, lab_fact, torch.ones_like(token_lp))
        nll = nll_sum / count.clamp(min=1)
        # KL(edited ‖ original) at each active fact's KL prompt
        kl_r = remap[kl_rows_t[facts_on]].to(device)
        kl_lp = torch.log_softmax(unembed(hidden[kl_r, row_lookup_t[kl_rows_t[facts_on]]
                                                 .to(device)]).float(), dim=-1)
        if kl_init is None:
            kl_init = kl_lp.detach().clone()  # step 0: every fact is active
        kl = torch.zeros(m, device=device)
        kl = kl.index_put((facts_on.to(device),),
                          (kl_lp.exp() * (kl_lp - kl_init[facts_on.to(device)])).sum(-1))
        decay = objective.weight_decay * delta.norm(dim=1) / h_norm ** 2
        loss = nll + objective.kl_factor * kl + decay  # (m,); meaningful for active facts
        loss_now = loss.detach().cpu()
        prob_now = (-nll.detach()).exp().cpu()
        for f in facts_on.tolist():
            i = index[f]
            if step == 0:
                result.loss_first[i], result.prob_before[i] = float(loss_now[f]), float(prob_now[f])
            result.loss_last[i], result.prob_after[i] = float(loss_now[f]), float(prob_now[f])
            result.steps[i] = step + 1
        stop = (loss_now < objective.stop_loss) | (step == objective.steps - 1)
        stopping = active & stop
        final[stopping.to(device)] = delta.detach()[stopping.to(device)]
        active &= ~stop
        if not active.any():
            break
        loss[active.to(device)].sum().backward()
        optimizer.step()
        with torch.no_grad():
            frozen = ~active.to(device)
            delta[frozen] = final[frozen]  # Adam's momentum must not move stopped facts
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12),
                                torch.ones_like(norms))
            delta.mul_(scale[:, None])
    result.delta[index] = final.cpu().float()
