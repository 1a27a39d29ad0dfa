"""Where do gradients of memorized vs non-memorized paragraphs land? Per layer, head and matrix.

    result = attribute(handle, mp_ids, nmp_ids, prefix_len=50)
    result.mp.values            # (n_layers, n_columns): pooled |∂NLL/∂θ| on memorized paragraphs
    result.columns              # ["W_Q H0", ..., "W_O H7", "W_in", "W_out"]
    result.contrastive          # the same for the contrastive objective (keep − change)

Stoehr et al. 2024 §4: the gradient of the suffix NLL w.r.t. every attention matrix (split per
head: W_Q, W_K, W_V, W_O) and MLP matrix (W_in, W_out) of every layer, in absolute value,
pooled per component as the max over its top ``top_frac`` (10%) entries (``reduce="mean"``
averages them instead), and summed per layer. Embeddings, biases and norms are excluded, as in
the reference code. Fused q/k/v storage (GPT-2, NeoX) is split by the architecture adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from memlens.memorization.contrastive import ContrastiveObjective
from memlens.memorization.data import PREFIX_LEN
from memlens.memorization.scan import suffix_token_nll

ATTN_KINDS = ("W_Q", "W_K", "W_V", "W_O")
MLP_KINDS = ("W_in", "W_out")
TOP_FRAC = 0.1


@dataclass
class WeightSlot:
    """One matrix memlens may attribute to or update: where it sits and what it is."""

    name: str  # parameter name in model.named_parameters()
    layer: int
    kind: str  # "W_QKV" (fused), "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"
    param: nn.Parameter


def weight_slots(handle) -> list[WeightSlot]:
    """Attention Q/K/V/O and MLP in/out weight matrices of every layer (no embeddings, biases
    or norms): the parameters attribution and the sparse update consider."""
    arch, model = handle.arch, handle.model
    spec = arch.spec
    slots: list[WeightSlot] = []
    for layer in range(arch.n_layers):
        block = f"{spec.blocks}.{layer}"
        paths: list[tuple[str, str]] = []
        if spec.qkv is not None:
            paths.append(("W_QKV", spec.qkv))
        else:
            paths += [("W_Q", spec.q), ("W_K", spec.k), ("W_V", spec.v)]
        paths.append(("W_O", spec.o))
        paths += [("W_in", path) for path in spec.mlp_in]
        paths.append(("W_out", spec.mlp_out))
        for kind, relative in paths:
            module_path = f"{block}.{relative}"
            param = model.get_submodule(module_path).weight
            slots.append(WeightSlot(f"{module_path}.weight", layer, kind, param))
    return slots


@contextmanager
def only_these_require_grad(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily make ``params`` the only parameters with ``requires_grad`` (saves compute)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def gradients(
    handle, loss_fn: Callable[[nn.Module], torch.Tensor], slots: list[WeightSlot] | None = None
) -> dict[str, torch.Tensor]:
    """∂loss/∂θ for every weight slot (name → gradient shaped like the weight)."""
    slots = weight_slots(handle) if slots is None else slots
    model = handle.model
    with only_these_require_grad(model, [s.param for s in slots]):
        loss = loss_fn(model)
        loss.backward()
        grads = {s.name: s.param.grad.detach().clone() for s in slots}
        for s in slots:
            s.param.grad = None
    return grads


def nll_loss(ids: torch.Tensor, prefix_len: int) -> Callable[[nn.Module], torch.Tensor]:
    """Loss function: mean teacher-forced NLL of the suffixes of ``ids`` (N, T)."""

    def loss(model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        return suffix_token_nll(logits, ids, prefix_len).mean()

    return loss


def split_components(handle, grads: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, kind) → gradient entries as (n_heads, entries) for W_Q/K/V/O, (1, entries) for
    MLP matrices (all MLP input matrices of a layer, e.g. Llama's gate and up, pooled as W_in)."""
    arch, model = handle.arch, handle.model
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    for slot in weight_slots(handle):
        grad = grads[slot.name]
        if slot.kind in ("W_QKV", "W_Q", "W_K", "W_V", "W_O"):
            which = ["q", "k", "v"] if slot.kind == "W_QKV" else [slot.kind[-1].lower()]
            for w in which:
                view = arch.attn_head_view(model, slot.layer, w, tensor=grad)
                out.setdefault((slot.layer, f"W_{w.upper()}"), []).append(
                    view.reshape(view.shape[0], -1))
        else:
            out.setdefault((slot.layer, slot.kind), []).append(grad.reshape(1, -1))
    return {key: torch.cat(parts, dim=1) for key, parts in out.items()}


def pool(values: torch.Tensor, top_frac: float = TOP_FRAC,
         reduce: Literal["max", "mean"] = "max") -> torch.Tensor:
    """Pool |values| (rows, entries) per row over its top ``top_frac`` entries (max or mean)."""
    magnitudes = values.abs().float()
    k = max(1, int(top_frac * magnitudes.shape[1]))
    top = magnitudes.topk(k, dim=1).values
    return top.max(dim=1).values if reduce == "max" else top.mean(dim=1)


@dataclass
class Attribution:
    """Pooled gradient magnitudes of one objective: (n_layers, n_columns) plus per-layer sums."""

    objective: str
    columns: list[str]
    values: torch.Tensor  # (n_layers, n_columns) pooled |grad| per head / matrix
    layer_sum: torch.Tensor  # (n_layers,) Σ |grad| over all attributed entries of the layer

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "columns": self.columns,
                "values": self.values.tolist(), "layer_sum": self.layer_sum.tolist()}


def attribution(
    handle, grads: dict[str, torch.Tensor], objective: str, *,
    top_frac: float = TOP_FRAC, reduce: Literal["max", "mean"] = "max",
) -> Attribution:
    """Pool gradients into per-head (attention) and per-matrix (MLP) scores for each layer."""
    parts = split_components(handle, grads)
    n_layers = handle.n_layers
    columns: list[str] = []
    for kind in ATTN_KINDS:
        n = parts[(0, kind)].shape[0]
        columns += [f"{kind} H{h}" for h in range(n)]
    columns += list(MLP_KINDS)
    values = torch.zeros(n_layers, len(columns))
    layer_sum = torch.zeros(n_layers)
    for layer in range(n_layers):
        row = [pool(parts[(layer, kind)], top_frac, reduce) for kind in (*ATTN_KINDS, *MLP_KINDS)]
        values[layer] = torch.cat(row)
    for slot in weight_slots(handle):
        layer_sum[slot.layer] += grads[slot.name].abs().sum().float()
    return Attribution(objective, columns, values, layer_sum)


@dataclass
class AttributionResult:
    """Attributions of the MP NLL, the NMP NLL and the contrastive objective."""

    mp: Attribution
    nmp: Attribution
    contrastive: Attribution | None

    @property
    def columns(self) -> list[str]:
        return self.mp.columns

    def to_dict(self) -> dict[str, Any]:
        return {"mp": self.mp.to_dict(), "nmp": self.nmp.to_dict(),
                "contrastive": None if self.contrastive is None else self.contrastive.to_dict(),
                "mp_minus_nmp": (self.mp.values - self.nmp.values).tolist()}


def attribute(
    handle,
    mp_ids: torch.Tensor,
    nmp_ids: torch.Tensor,
    *,
    prefix_len: int = PREFIX_LEN,
    contrastive: bool = True,
    top_frac: float = TOP_FRAC,
    reduce: Literal["max", "mean"] = "max",
) -> AttributionResult:
    """Gradient attribution of memorized vs non-memorized paragraphs (and of the CO).

    Example::

        mp, nmp = scan(handle, paragraphs).split(paragraphs)
        result = attribute(handle, paragraph_tensor(mp), paragraph_tensor(nmp))
        result.mp.values.argmax()
    """
    kwargs = dict(top_frac=top_frac, reduce=reduce)
    mp = attribution(handle, gradients(handle, nll_loss(mp_ids, prefix_len)), "mp_nll", **kwargs)
    nmp = attribution(handle, gradients(handle, nll_loss(nmp_ids, prefix_len)), "nmp_nll",
                      **kwargs)
    co = None
    if contrastive:
        objective = ContrastiveObjective.build(handle.model, mp_ids, nmp_ids,
                                               prefix_len=prefix_len)
        co = attribution(handle, gradients(handle, lambda m: objective(m)[0]), "contrastive",
                         **kwargs)
    return AttributionResult(mp, nmp, co)
