"""Perturb memorized prefixes one token at a time and see which swaps break recall.

    result = perturb(handle, mp_paragraphs)            # swap = the model's 2nd / 1st choice
    result.em_drop                                     # (N, P - 1) EM lost per prefix position
    pmp = result.pmp_ids                               # (N, P + S) perturbed memorized paragraphs

Stoehr et al. 2024 §3: for every prefix position t ≠ 0, replace token t — by a uniformly random
token (``mode="random"``), or (``mode="model"``) by the model's second choice at t when the
original was its first choice, else by its first choice — and decode greedily again. The drop
in EM and the rise in NLL of the original suffix measure how much recall depends on that token.
The perturbed memorized paragraph (PMP) of a paragraph is its prefix with the most damaging swap
followed by the new greedy continuation: the target of memorization *editing*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from memlens.errors import InvalidArgument
from memlens.memorization.data import PREFIX_LEN, Paragraph, paragraph_tensor
from memlens.memorization.scan import _progress, evaluate

Mode = Literal["model", "random"]


@dataclass
class PerturbResult:
    """EM / NLL changes per (paragraph, prefix position) and the PMP of each paragraph."""

    ids: list[str]
    positions: list[int]  # perturbed prefix positions (1 .. P - 1)
    mode: str
    base_em: torch.Tensor  # (N,)
    base_nll: torch.Tensor  # (N,)
    em_drop: torch.Tensor  # (N, len(positions)) base EM − perturbed EM
    nll_increase: torch.Tensor  # (N, len(positions)) perturbed NLL − base NLL
    swaps: torch.Tensor  # (N, len(positions)) the token put in at each position
    pmp_ids: torch.Tensor  # (N, P + S) perturbed prefix + its new greedy continuation
    pmp_position: list[int]  # position of the most damaging swap per paragraph

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "ids": self.ids, "positions": self.positions,
            "base_em": self.base_em.tolist(), "base_nll": self.base_nll.tolist(),
            "em_drop": self.em_drop.tolist(), "nll_increase": self.nll_increase.tolist(),
            "mean_em_drop_by_position": self.em_drop.float().mean(0).tolist(),
            "mean_nll_increase_by_position": self.nll_increase.mean(0).tolist(),
            "pmp_position": self.pmp_position, "pmp_ids": self.pmp_ids.tolist(),
        }


@torch.no_grad()
def swap_tokens(
    model, ids: torch.Tensor, positions: list[int], mode: Mode = "model",
    *, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replacement token (N, len(positions)) for each paragraph and position (see module doc)."""
    if mode == "random":
        vocab = int(model.config.vocab_size)
        draw = torch.randint(0, vocab - 1, (ids.shape[0], len(positions)), generator=generator)
        original = ids[:, positions]
        return draw + (draw >= original).long()  # uniform over the vocabulary minus the original
    if mode != "model":
        raise InvalidArgument(f"unknown perturbation mode {mode!r}: 'model' or 'random'")
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), use_cache=False).logits.cpu()  # (N, T, V)
    index = torch.tensor(positions) - 1
    top2 = logits[:, index].topk(2, dim=-1).indices  # (N, len, 2) the model's 1st and 2nd choice
    original = ids[:, positions]
    return torch.where(top2[..., 0] == original, top2[..., 1], top2[..., 0])


def perturb(
    handle,
    paragraphs: list[Paragraph],
    *,
    prefix_len: int = PREFIX_LEN,
    mode: Mode = "model",
    positions: list[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> PerturbResult:
    """Swap each prefix position of each paragraph, re-decode, record EM / NLL changes.

    Example::

        mp, _ = scan(handle, paragraphs).split(paragraphs)
        result = perturb(handle, mp, mode="model")
        result.em_drop.float().mean(0)          # which prefix positions matter most
    """
    ids = paragraph_tensor(paragraphs)
    positions = list(range(1, prefix_len)) if positions is None else list(positions)
    if any(not 0 < p < prefix_len for p in positions):
        raise InvalidArgument(f"positions must lie in 1..{prefix_len - 1} (position 0 is never "
                         f"perturbed), got {positions}")
    model = handle.model
    base = evaluate(model, ids, prefix_len, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    swaps = swap_tokens(model, ids, positions, mode, generator=generator)
    n, k = ids.shape[0], len(positions)
    variants = ids.repeat_interleave(k, dim=0)  # (N * k, T): paragraph i, position j at i*k + j
    rows = torch.arange(n * k)
    variants[rows, torch.tensor(positions).repeat(n)] = swaps.reshape(-1)
    with _progress(progress, f"perturb ({mode})", n * k) as advance:
        ev = evaluate(model, variants, prefix_len, batch_size=batch_size, on_batch=advance)
    em = ev.em.view(n, k)
    nll = ev.nll.view(n, k)
    em_drop = base.em[:, None] - em
    nll_increase = nll - base.nll[:, None]
    # Most damaging swap: largest EM drop, ties broken by the largest NLL increase.
    score = em_drop.double() * 1e6 + nll_increase.double()
    best = score.argmax(dim=1)
    chosen = best + torch.arange(n) * k
    pmp = torch.cat([variants[chosen, :prefix_len], ev.continuation[chosen]], dim=1)
    return PerturbResult(
        ids=[p.id for p in paragraphs], positions=positions, mode=mode, base_em=base.em,
        base_nll=base.nll, em_drop=em_drop, nll_increase=nll_increase, swaps=swaps,
        pmp_ids=pmp, pmp_position=[positions[int(b)] for b in best],
    )
