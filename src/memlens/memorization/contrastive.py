"""The contrastive objective (CO) of Stoehr et al. 2024: change memorized text, keep the rest.

    objective = ContrastiveObjective.build(handle.model, mp_ids, nmp_ids, prefix_len=50)
    loss, parts = objective(handle.model)              # unlearning: keep − change
    objective = ContrastiveObjective.build(handle.model, mp_ids, nmp_ids, mode="edit",
                                           pmp_ids=perturbed.pmp_ids)
    loss, parts = objective(handle.model)              # editing: keep + NLL of PMP continuation

keep   = KL(p_original ‖ p_current) of next-token distributions on the NMP continuation
         positions (prefix_len − 1 .. T − 2, i.e. 49..98), p_original fixed before any update;
         summed over positions and averaged over paragraphs, as the reference code's
         ``KLDivLoss(reduction="batchmean")`` does.
change = change_weight (0.1) · mean NLL of the MP continuations.
Unlearning minimises keep − change (push MP likelihood down); editing minimises keep +
change_weight · NLL of the PMP continuation placed after the ORIGINAL prefix, so that greedy
decoding of the memorized prefix yields the perturbed continuation instead. (The reference
feeds the original paragraph and scores the perturbed tokens as labels; teacher-forcing the
target continuation itself is the standard form and what memlens uses.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memlens.errors import EmptyInput, InvalidArgument
from memlens.memorization.data import PREFIX_LEN
from memlens.memorization.scan import suffix_token_nll

CHANGE_WEIGHT = 0.1  # the reference code's c_set_norm


@dataclass
class ContrastiveObjective:
    """Loss of the contrastive objective; call it with the (possibly updated) model."""

    change_ids: torch.Tensor  # (Nc, T) MP paragraphs (unlearn) or prefix + PMP continuation (edit)
    keep_ids: torch.Tensor  # (Nk, T) NMP paragraphs
    keep_logprobs: torch.Tensor  # (Nk, S, V) log p_original on the NMP continuation positions
    prefix_len: int
    mode: Literal["unlearn", "edit"]
    change_weight: float = CHANGE_WEIGHT

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        mp_ids: torch.Tensor,
        nmp_ids: torch.Tensor,
        *,
        prefix_len: int = PREFIX_LEN,
        mode: Literal["unlearn", "edit"] = "unlearn",
        pmp_ids: torch.Tensor | None = None,
        change_weight: float = CHANGE_WEIGHT,
    ) -> ContrastiveObjective:
        """Fix the original NMP distributions now, before any update.

        Example::

            co = ContrastiveObjective.build(model, mp_ids, nmp_ids)
            loss, parts = co(model); loss.backward()
        """
        if mp_ids.shape[0] == 0:
            raise EmptyInput("the contrastive objective needs at least one memorized paragraph "
                             "(MP); the scan found none")
        if nmp_ids.shape[0] == 0:
            raise EmptyInput("the contrastive objective needs at least one non-memorized "
                             "paragraph (NMP); the scan found none")
        if mode not in ("unlearn", "edit"):
            raise InvalidArgument(f"mode must be 'unlearn' or 'edit', got {mode!r}")
        change_ids = mp_ids
        if mode == "edit":
            if pmp_ids is None or pmp_ids.shape != mp_ids.shape:
                raise InvalidArgument("editing needs pmp_ids shaped like mp_ids (run perturb first)")
            change_ids = torch.cat([mp_ids[:, :prefix_len], pmp_ids[:, prefix_len:]], dim=1)
        device = next(model.parameters()).device
        logits = model(input_ids=nmp_ids.to(device), use_cache=False).logits
        keep_logprobs = F.log_softmax(logits[:, prefix_len - 1:-1].float(), dim=-1)
        return cls(change_ids.cpu(), nmp_ids.cpu(), keep_logprobs, prefix_len, mode,
                   change_weight)

    def keep(self, model: nn.Module) -> torch.Tensor:
        """KL(p_original ‖ p_current) on the NMP continuation positions (batchmean)."""
        device = next(model.parameters()).device
        logits = model(input_ids=self.keep_ids.to(device), use_cache=False).logits
        current = F.log_softmax(logits[:, self.prefix_len - 1:-1].float(), dim=-1)
        original = self.keep_logprobs.to(device)
        kl = (original.exp() * (original - current)).sum(dim=-1)  # (Nk, S)
        return kl.sum() / kl.shape[0]

    def change_nll(self, model: nn.Module) -> torch.Tensor:
        """Mean NLL of the change set's continuation (MP suffix, or the PMP continuation)."""
        device = next(model.parameters()).device
        logits = model(input_ids=self.change_ids.to(device), use_cache=False).logits
        return suffix_token_nll(logits, self.change_ids, self.prefix_len).mean()

    def __call__(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, {"keep", "change_nll", "loss"}) for the current weights of ``model``."""
        keep = self.keep(model)
        nll = self.change_nll(model)
        sign = -1.0 if self.mode == "unlearn" else 1.0
        loss = keep + sign * self.change_weight * nll
        return loss, {"keep": keep.item(), "change_nll": nll.item(), "loss": loss.item()}
