"""Teacher-forced scoring of answers after prompts, and seeded text generation (batched).

    scores = score_targets(handle, ["Toulouse is a city in"] * 2, ["France", "Japan"])
    scores[0].nll, scores[0].hits          # mean-token NLL, per-token top-1 hits
    texts = generate(handle, ["Toulouse is"], max_new_tokens=50, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memlens.errors import MemlensError
from memlens.tokens import answer_ids, pad_id, pad_rows


@dataclass
class TargetScore:
    """How a model scores one answer after one prompt."""

    nll: float  # mean over the answer's tokens of −log p(token | prompt, earlier tokens)
    hits: list[bool]  # per answer token: is it the model's top-1 prediction (teacher forced)?

    @property
    def prob(self) -> float:
        """exp(−mean NLL): the per-token geometric-mean probability."""
        return float(torch.tensor(-self.nll).exp())


@torch.no_grad()
def score_targets(handle: Any, prompts: Sequence[str], targets: Sequence[str], *,
                  batch_size: int = 32) -> list[TargetScore]:
    """Score ``targets[i]`` as the continuation of ``prompts[i]`` (teacher forcing)."""
    if len(prompts) != len(targets):
        raise MemlensError(f"{len(prompts)} prompts but {len(targets)} targets")
    tok = handle.tokenizer
    rows, spans = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        head = tok(prompt, add_special_tokens=True)["input_ids"]
        answer = answer_ids(tok, prompt, target)
        rows.append(head + answer)
        spans.append((len(head), answer))
    limit = handle.max_length
    for i, row in enumerate(rows):
        if limit is not None and len(row) > limit:
            raise MemlensError(f"prompt + target {i} ({prompts[i][:50]!r}…) has {len(row)} "
                               f"tokens; the model's context is {limit}")
    pad = pad_id(tok)
    out: list[TargetScore] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids, mask = pad_rows(chunk, pad)
        logits = handle.model(input_ids=ids.to(handle.device),
                              attention_mask=mask.to(handle.device), use_cache=False).logits.float()
        for i in range(len(chunk)):
            n_head, answer = spans[start + i]
            positions = torch.arange(n_head - 1, n_head - 1 + len(answer))
            row_logits = logits[i, positions]
            log_probs = F.log_softmax(row_logits, dim=-1)
            wanted = torch.tensor(answer, device=log_probs.device)
            nll = -log_probs.gather(1, wanted[:, None]).mean()
            hits = (row_logits.argmax(-1) == wanted).tolist()
            out.append(TargetScore(nll=float(nll), hits=hits))
    return out


@torch.no_grad()
def generate(handle: Any, prompts: Sequence[str], *, max_new_tokens: int = 50,
             sample: bool = True, top_k: int = 5, seed: int = 0) -> list[str]:
    """Prompt + continuation for each prompt: top-k sampling (seeded) or greedy; left-padded
    batch so all rows continue at once."""
    if not prompts:
        return []
    tok = handle.tokenizer
    limit = handle.max_length
    rows = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if limit is not None:
        max_new_tokens = max(1, min(max_new_tokens, limit - max(len(r) for r in rows)))
    pad = pad_id(tok)
    width = max(len(r) for r in rows)
    ids, mask = pad_rows(rows, pad, starts=[width - len(r) for r in rows])  # left-padded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = handle.model.generate(
            input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device),
            do_sample=sample, top_k=top_k if sample else None, max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    return [p + tok.decode(row[width:], skip_special_tokens=True)
            for p, row in zip(prompts, out.cpu(), strict=True)]
