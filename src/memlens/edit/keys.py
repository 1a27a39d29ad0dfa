"""Activations of MANY requests at their fact token, read in a few batched forward passes:
MEMIT's keys K_l (averaged over context templates) and hidden states H (bare prompt).

    reads = fact_token_reads(handle, requests, templates, "subject_last",
                             {"blocks.3.mlp.hook_post": "mean", "blocks.5.hook_resid_post": "bare"})
    K = reads["blocks.3.mlp.hook_post"]      # (n, d_ff): k_i = mean_j k(x_ij) at the fact token
    H = reads["blocks.5.hook_resid_post"]    # (n, d_model): at the bare prompt ("{}")

This generalises :func:`memlens.edit.compute.compute_k_star` (one request, one layer) to many
requests and several points in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from memlens import hooks
from memlens.edit.compute import fact_position, templated_prompts
from memlens.edit.requests import EditRequest
from memlens.errors import MemlensError

Reduce = Literal["mean", "bare"]


@torch.no_grad()
def fact_token_reads(
    handle: Any,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    fact_token: str,
    points: Mapping[str, Reduce],
    *,
    max_batch_tokens: int = 16384,
) -> dict[str, torch.Tensor]:
    """For each point, the activation at each request's fact token, as (n, d) float32:
    ``"mean"`` averages over ``templates``, ``"bare"`` takes the template ``"{}"`` (which must
    be ``templates[0]``, as :func:`memlens.edit.context.context_templates` returns them)."""
    if not requests:
        raise MemlensError("no requests to read keys for")
    if any(r == "bare" for r in points.values()) and templates[0] != "{}":
        raise MemlensError(f"the first context template must be '{{}}', got {templates[0]!r}")
    tok = handle.tokenizer
    texts: list[str] = []
    lookups: list[int] = []
    for request in requests:
        for prompt in templated_prompts(request, templates):
            texts.append(prompt.format(request.subject))
            lookups.append(fact_position(tok, prompt, request.subject, fact_token))
    n_t = len(templates)
    lengths = [len(tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
    per_request = max(1, max_batch_tokens // (n_t * max(lengths)))
    out: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    for start in range(0, len(requests), per_request):
        lo, hi = start * n_t, min(len(requests), start + per_request) * n_t
        batch = handle.encode(texts[lo:hi]).to(handle.device)
        with hooks.capture(handle.model, list(points)) as cache:
            handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False)
        rows = torch.arange(hi - lo)
        pos = torch.tensor(lookups[lo:hi])
        for point, reduce in points.items():
            acts = cache[point][rows, pos].float().cpu()  # (rows, d)
            acts = acts.view(-1, n_t, acts.shape[-1])  # (requests, templates, d)
            out[point].append(acts.mean(1) if reduce == "mean" else acts[:, 0])
    return {p: torch.cat(v) for p, v in out.items()}
