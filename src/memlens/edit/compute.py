"""The two vectors of a rank-one edit: the key k* and the value v* (ROME §3.1, eqs. 3–4).

    positions = fact_positions(tok, ["{} is a city in"], "Toulouse", "subject_last")
    keys = compute_k_star(handle, request, layer, templates, "subject_last")
    vstar = compute_v_star(handle, request, layer, templates, keys, hparams, target_ids)

k* = mean over context templates of the key (input of W) at the fact token.
v* = W k* + b + δ, δ minimising
    NLL(target_new | templated prompts) + kl_factor · KL(edited ‖ original) on "{s} is a"
    + v_weight_decay · ‖δ‖ / ‖v₀‖²,            with ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖,
where δ is added to the MLP output at the fact token and v₀ = W k* + b. (The reference code
computes KL(edited ‖ original) as the paper's eq. 4 writes it, and the decay as ‖δ‖/‖v₀‖².)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from memlens import hooks
from memlens.edit.hparams import ROMEHyperParams
from memlens.edit.requests import EditRequest
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
        handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    rows = torch.arange(len(prompts))
    keys = cache[point][rows, torch.tensor(positions)].float()  # (n_templates, d_ff)
    return Keys(k_star=keys.mean(0), keys=keys, positions=positions)


def mlp_output_of(handle: Any, layer: int, k: torch.Tensor) -> torch.Tensor:
    """v = W k + b: what the edited matrix (with its bias) writes for key ``k``."""
    W = handle.arch.get_edit_weight(handle.model, layer).float()
    module = handle.model.get_submodule(handle.arch.module_name(layer, "mlp_out"))
    bias = getattr(module, "bias", None)
    v = W @ k.to(W.device, W.dtype)
    return v if bias is None else v + bias.detach().float()


@dataclass
class VStar:
    """Result of the v* optimisation."""

    v_star: torch.Tensor  # (d_model,) = v0 + δ
    delta: torch.Tensor  # (d_model,) δ
    v0: torch.Tensor  # (d_model,) W k* + b
    losses: list[dict[str, float]] = field(default_factory=list)  # per step: total/nll/kl/decay
    prob_before: float = 0.0  # mean P(target token) over the templated prompts, δ = 0
    prob_after: float = 0.0  # same with the final δ

    def summary(self) -> dict[str, Any]:
        return {"steps": len(self.losses), "loss_first": self.losses[0], "loss_last":
                self.losses[-1], "prob_before": self.prob_before, "prob_after": self.prob_after,
                "delta_norm": float(self.delta.norm()), "v0_norm": float(self.v0.norm())}


def compute_v_star(handle: Any, request: EditRequest, layer: int, templates: Sequence[str],
                   keys: Keys, hparams: ROMEHyperParams, target: Sequence[int]) -> VStar:
    """Optimise δ added to the MLP output at the fact token (see module docstring)."""
    model, tok = handle.model, handle.tokenizer
    prompts = templated_prompts(request, templates)
    kl_template = hparams.kl_prompt
    rows: list[list[int]] = []
    lookups: list[int] = []
    label_pos: list[tuple[int, int, int]] = []  # (row, position predicting, token id)
    for r, p in enumerate(prompts):
        ids = tok(p.format(request.subject), add_special_tokens=True)["input_ids"]
        for j, token in enumerate(target):
            label_pos.append((r, len(ids) - 1 + j, token))
        rows.append(ids + list(target[:-1]))
        lookups.append(keys.positions[r])
    kl_row = len(rows)
    rows.append(tok(kl_template.format(request.subject), add_special_tokens=True)["input_ids"])
    lookups.append(fact_position(tok, kl_template, request.subject, hparams.fact_token))

    device = handle.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    lab_rows = torch.tensor([x[0] for x in label_pos], device=device)
    lab_pos = torch.tensor([x[1] for x in label_pos], device=device)
    lab_tok = torch.tensor([x[2] for x in label_pos], device=device)

    v0 = mlp_output_of(handle, layer, keys.k_star)  # W k* + b
    out_device = model.get_submodule(handle.arch.module_name(layer, "mlp_out")).weight.device
    delta = torch.zeros(v0.shape[0], device=out_device, requires_grad=True)
    at_lookup = torch.zeros(len(rows), width, 1, device=out_device)
    at_lookup[torch.arange(len(rows)), torch.tensor(lookups)] = 1.0
    max_norm = hparams.clamp_norm_factor * v0.norm().to(out_device)
    v0_sq = v0.norm().to(out_device) ** 2

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        return out + (at_lookup * delta).to(out.dtype)

    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init: torch.Tensor | None = None
    result = VStar(v_star=v0, delta=delta, v0=v0)
    try:
        with hooks.edit(model, f"blocks.{layer}.hook_mlp_out", add_delta):
            for step in range(hparams.v_num_grad_steps):
                optimizer.zero_grad()
                logits = model(input_ids=input_ids, attention_mask=attention).logits
                log_probs = F.log_softmax(logits[lab_rows, lab_pos].float(), dim=-1)
                token_lp = log_probs.gather(1, lab_tok[:, None]).squeeze(1)
                nll = -token_lp.mean()
                kl_lp = F.log_softmax(logits[kl_row, lookups[kl_row]].float(), dim=-1)[None]
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                    result.prob_before = float(token_lp.detach().exp().mean())
                kl = hparams.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True,
                                                  reduction="batchmean")
                decay = hparams.v_weight_decay * delta.norm() / v0_sq
                loss = nll + kl + decay
                result.losses.append({"loss": float(loss.detach()), "nll": float(nll.detach()), "kl": float(kl.detach()),
                                      "decay": float(decay.detach()),
                                      "prob": float(token_lp.detach().exp().mean())})
                result.prob_after = float(token_lp.detach().exp().mean())
                if loss.item() < hparams.v_stop_loss or step == hparams.v_num_grad_steps - 1:
                    break
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    final = delta.detach().to(v0.device)
    result.delta, result.v_star = final, v0 + final
    return result
