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
(:class:`_SuffixPasses`; the rest is computed once and cached); ``suffix_only=False`` runs the
whole model each step, as the reference does (:class:`_FullPasses`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from memlens import hooks
from memlens.edit.compute import fact_position, templated_prompts
from memlens.edit.requests import EditRequest
from memlens.errors import MemlensError, NumericalError
from memlens.model import kv_cache_kwargs, kv_cache_of


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


def _chunks(facts: list[_Fact], max_batch_tokens: int, suffix_only: bool) -> list[list[int]]:
    """Fact indices grouped so that rows × widest row ≤ max_batch_tokens, facts taken in order
    of the width a pass pads them to (the suffix from the fact token, or the whole row), so
    that each group pads little."""
    def width(fact: _Fact) -> int:
        return max(len(r) - (p if suffix_only else 0)
                   for r, p in zip(fact.rows, fact.lookups, strict=True))

    groups: list[list[int]] = []
    current: list[int] = []
    n_rows = widest = 0
    for i in sorted(range(len(facts)), key=lambda i: width(facts[i])):
        fact = facts[i]
        w = max(widest, max(len(r) for r in fact.rows))
        if current and (n_rows + len(fact.rows)) * w > max_batch_tokens:
            groups.append(current)
            current, n_rows, w = [], 0, max(len(r) for r in fact.rows)
        current.append(i)
        n_rows += len(fact.rows)
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
) -> DeltaResult:
    """Optimise δ_i for every request in batches of whole facts (see module docstring).

    ``point`` is the hook name where δ is added (e.g. ``blocks.L.hook_resid_post`` for MEMIT,
    ``blocks.L.hook_mlp_out`` for ROME); ``init`` (n, d) holds h_i, the activation there at the
    bare prompt's fact token (it sets the clamp radius and the decay scale). ``targets[i]`` are
    the token ids of requests[i].target_new as they follow its prompt. Facts are packed into
    forward passes of at most ``max_batch_tokens`` padded tokens; ``max_batch_tokens=0`` puts
    each fact alone (the one-after-another reference loop). ``suffix_only`` runs only what δ
    can change (blocks from the point's up, positions from the fact token on; see
    :class:`_SuffixPasses`); ``False`` runs the whole model each step, as the reference does.

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
        for group in groups:
            _optimize_group(handle, point, [facts[i] for i in group], group, result, objective,
                            suffix_only)
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
                    result: DeltaResult, objective: DeltaObjective, suffix_only: bool) -> None:
    """Optimise the δ of the facts ``index`` (one batch) into ``result``."""
    device = handle.device
    rows = [r for f in facts for r in f.rows]
    lookups = [p for f in facts for p in f.lookups]
    passes = (_SuffixPasses if suffix_only else _FullPasses)(handle, point, rows, lookups)
    row_fact, kl_rows, labels = [], [], []
    offset = 0
    for f, fact in enumerate(facts):
        row_fact += [f] * len(fact.rows)
        kl_rows.append(offset + len(fact.rows) - 1)
        labels += [(offset + r, pos, t, f) for r, pos, t in fact.labels]
        offset += len(fact.rows)
    row_fact_t = torch.tensor(row_fact)
    kl_rows_t = torch.tensor(kl_rows)
    lab = torch.tensor(labels)  # (n_labels, 4): row, position, token, fact
    lab[:, 1] = passes.column(lab[:, 0], lab[:, 1])  # position → column of the pass
    kl_cols = passes.column(kl_rows_t, torch.tensor(lookups)[kl_rows_t])
    m = len(facts)
    h = result.init[index].to(device)  # (m, d)
    h_norm = h.norm(dim=1)
    max_norm = objective.clamp_norm_factor * h_norm
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=objective.lr)
    active = torch.ones(m, dtype=torch.bool)
    final = torch.zeros_like(h)
    kl_init: torch.Tensor | None = None
    unembed = handle.arch.unembedding(handle.model)

    for step in range(objective.steps):
        facts_on = active.nonzero().squeeze(1)
        row_on = active[row_fact_t].nonzero().squeeze(1)  # rows of active facts
        remap = torch.full((len(rows),), -1, dtype=torch.long)
        remap[row_on] = torch.arange(len(row_on))
        lab_on = lab[active[lab[:, 3]]]
        rows_idx = torch.arange(len(row_on), device=device)
        look_idx = passes.fact_column(row_on).to(device)
        fact_of_row = row_fact_t[row_on].to(device)

        def add_delta(out: torch.Tensor, rows_idx=rows_idx, look_idx=look_idx,
                      fact_of_row=fact_of_row) -> torch.Tensor:
            return out.index_put((rows_idx, look_idx), delta[fact_of_row].to(out.dtype),
                                 accumulate=True)

        optimizer.zero_grad()
        hidden = passes.run(row_on, add_delta)
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
        kl_lp = torch.log_softmax(unembed(hidden[kl_r, kl_cols[facts_on].to(device)]).float(),
                                  dim=-1)
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


class _FullPasses:
    """Each step runs the whole model on the whole right-padded rows (the reference's way)."""

    def __init__(self, handle: Any, point: str, rows: list[list[int]], lookups: list[int]):
        self.handle, self.point = handle, point
        self.input_ids, self.attention = _padded(handle.tokenizer, rows)
        self.lookups = torch.tensor(lookups)

    def column(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Column of the pass's output holding token ``positions`` of ``rows``."""
        return positions

    def fact_column(self, rows: torch.Tensor) -> torch.Tensor:
        return self.lookups[rows]

    def run(self, rows: torch.Tensor, add_delta) -> torch.Tensor:
        """Final hidden states (before the unembedding) of ``rows`` with δ added at the point."""
        device = self.handle.device
        with hooks.edit(self.handle.model, self.point, add_delta):
            return self.handle.model.base_model(
                input_ids=self.input_ids[rows].to(device),
                attention_mask=self.attention[rows].to(device)).last_hidden_state


class _SuffixPasses:
    """Each step runs only what δ can change: the blocks from the point's block up, on the
    positions from the fact token on.

    Rows are left-padded so that every fact token sits in column P. One pass without gradients
    stores the KV cache of columns < P and the output, on columns ≥ P, of the last block below
    the point (δ reaches neither). Each step is then a cached forward over the S ≥ 1 suffix
    columns in which the blocks below the point return that stored output without running.
    Real tokens keep their positions, so the losses equal :class:`_FullPasses`' up to float
    rounding.
    """

    def __init__(self, handle: Any, point: str, rows: list[list[int]], lookups: list[int]):
        self.handle, self.point = handle, point
        model, device = handle.model, handle.device
        self.lookups = torch.tensor(lookups)
        width = max(len(r) - p for r, p in zip(rows, lookups, strict=True))
        self.n_prefix = P = int(self.lookups.max())
        ids = torch.full((len(rows), P + width), _pad_id(handle.tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (r, p) in enumerate(zip(rows, lookups, strict=True)):
            ids[i, P - p: P - p + len(r)] = torch.tensor(r)
            mask[i, P - p: P - p + len(r)] = 1
        self.attention = mask.to(device)
        self.positions = (mask.cumsum(1) - 1).clamp(min=0).to(device)
        self.suffix = ids[:, P:].to(device)
        self.skipped = _blocks_below(point)
        points = [f"blocks.{self.skipped - 1}.hook_resid_post"] if self.skipped else []
        structure: list[int] = []
        probe = handle.arch.blocks(model)[0].register_forward_hook(
            lambda module, args, out: structure.append(len(out) if isinstance(out, tuple) else 0))
        try:
            with torch.no_grad(), hooks.capture(model, points) as cache:
                out = model(input_ids=ids.to(device), attention_mask=self.attention,
                            position_ids=self.positions, use_cache=True, logits_to_keep=1)
        finally:
            probe.remove()
        self.tuple_len = structure[0]
        self.entry = cache[points[0]][:, P:] if points else None
        keep = self.attention[:, None, :P, None].bool()  # padded keys/values → 0, not NaN
        layers = kv_cache_of(out).layers
        self.prefix_kv = [(torch.where(keep, layer.keys[:, :, :P], 0.0),
                           torch.where(keep, layer.values[:, :, :P], 0.0))
                          for layer in layers[self.skipped:]] if P else None
        # skipped blocks never read their cache layer: a zero-stride stand-in of the prefix's
        # shape keeps the cache's length (read from layer 0) without copying anything, also
        # when every block is skipped (the point is the last block's output)
        self.stand_in = tuple(t.new_zeros(()).expand(1, t.shape[1], P, *t.shape[3:])
                              for t in (layers[0].keys, layers[0].values))

    def column(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions - self.lookups[rows]

    def fact_column(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rows)

    def run(self, rows: torch.Tensor, add_delta) -> torch.Tensor:
        with hooks.edit(self.handle.model, self.point, add_delta), self._skip_lower(rows):
            return self._forward(rows)

    def _forward(self, rows: torch.Tensor) -> torch.Tensor:
        model = self.handle.model
        rows = rows.to(self.handle.device)
        past = None
        if self.prefix_kv is not None:
            from transformers import DynamicCache

            stand_in = tuple(t.expand(len(rows), -1, -1, -1) for t in self.stand_in)
            past = DynamicCache([stand_in] * self.skipped
                                + [(k[rows], v[rows]) for k, v in self.prefix_kv],
                                config=model.config)
        return model.base_model(
            input_ids=self.suffix[rows], attention_mask=self.attention[rows],
            position_ids=self.positions[rows, self.n_prefix:], use_cache=past is not None,
            **kv_cache_kwargs(model.base_model, past)).last_hidden_state

    @contextmanager
    def _skip_lower(self, rows: torch.Tensor) -> Iterator[None]:
        """Blocks below the point return the stored entry (of ``rows``) without running; only
        the last one's output is read by the next block."""
        if self.entry is None:
            yield
            return
        blocks = self.handle.arch.blocks(self.handle.model)
        forward = _returning(self.entry[rows.to(self.entry.device)], self.tuple_len)
        with hooks.forwards_replaced([(blocks[j], forward) for j in range(self.skipped)]):
            yield


def _returning(stored: torch.Tensor, tuple_len: int):
    """A block forward that computes nothing and returns ``stored`` (as the block would)."""

    def forward(*args, **kwargs):
        out = stored.clone()
        return (out, *(None,) * max(0, tuple_len - 1)) if tuple_len else out

    return forward


def _blocks_below(point: str) -> int:
    """How many blocks δ at ``point`` cannot change: those below its block, and the block too
    when the point is the block's output (``blocks.L.hook_resid_post``)."""
    match = re.match(r"^blocks\.(\d+)\.(\w+)", point)
    if not match:
        return 0
    layer = int(match.group(1))
    return layer + 1 if match.group(2) == "hook_resid_post" else layer


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def _padded(tok: Any, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask of ``rows``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), _pad_id(tok), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
    return input_ids, attention
