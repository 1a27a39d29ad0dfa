"""Keys of an edit: where a fact's key is read and k*, its mean over context templates
(ROME §3.1, eq. 3), plus what the edited matrix writes for a key.

    position = fact_position(tok, "{} is a city in", "Toulouse", "subject_last")
    keys = compute_k_star(handle, request, layer, templates, "subject_last")
    v0 = mlp_output_of(handle, layer, keys.k_star)       # W k* + b

The value v* (eq. 4) is optimised by :mod:`memlens.edit.optimize`, shared with MEMIT's z.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memlens import hooks
from memlens.edit.requests import EditRequest
from memlens.offload import read_tensor
from memlens.tokens import subject_span


def fact_position(tokenizer, template: str, subject: str, fact_token: str) -> int:
    """Token index where keys are read in ``template.format(subject)``: the subject's last or
    first token (the occurrence that fills ``{}``), or the text's last token."""
    text = template.format(subject)
    if fact_token == "last":
        return len(tokenizer(text, add_special_tokens=True)["input_ids"]) - 1
    occurrence = template[: template.index("{}")].count(subject)
    span = subject_span(tokenizer, text, subject, occurrence=occurrence)
    return span.last if fact_token == "subject_last" else span.first


def templated_prompts(request: EditRequest, templates: Sequence[str]) -> list[str]:
    """Each context template wrapped around the request's prompt, still with ``{}``."""
    return [t.format(request.prompt) for t in templates]


@dataclass
class Keys:
    """Keys of one request at one layer."""

    k_star: torch.Tensor  # (d_ff,) mean over templates, float32
    keys: torch.Tensor  # (n_templates, d_ff); row 0 = the bare prompt
    positions: list[int]  # fact-token index in each templated prompt

    @property
    def k_bare(self) -> torch.Tensor:
        return self.keys[0]


@torch.no_grad()
def compute_k_star(handle: Any, request: EditRequest, layer: int, templates: Sequence[str],
                   fact_token: str) -> Keys:
    """k* = (1/N) Σ_j k(x_j + s) at the fact token, one batched forward pass."""
    prompts = templated_prompts(request, templates)
    positions = [fact_position(handle.tokenizer, p, request.subject, fact_token) for p in prompts]
    batch = handle.encode([p.format(request.subject) for p in prompts])
    point = f"blocks.{layer}.mlp.hook_post"
    with hooks.capture(handle.model, [point]) as cache:
        handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False)
    rows = torch.arange(len(prompts))
    keys = cache[point][rows, torch.tensor(positions)].float()  # (n_templates, d_ff)
    return Keys(k_star=keys.mean(0), keys=keys, positions=positions)


def mlp_output_of(handle: Any, layer: int, k: torch.Tensor) -> torch.Tensor:
    """v = W k + b: what the edited matrix (with its bias) writes for key ``k``."""
    W = handle.arch.get_edit_weight(handle.model, layer).float()
    name = handle.arch.module_name(layer, "mlp_out")
    if getattr(handle.model.get_submodule(name), "bias", None) is None:
        return W @ k.to(W.device, W.dtype)
    bias = read_tensor(handle.model, f"{name}.bias")  # an offloaded bias from its weights map
    return W @ k.to(W.device, W.dtype) + bias.float().to(W.device)
