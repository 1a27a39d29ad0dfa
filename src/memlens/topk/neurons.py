"""What each MLP neuron responds to: token entropy, semantic entropy and top tokens.

    report = neuron_report(handle, blocks)                  # blocks: LongTensor (N, T) of text
    report.layers[0].token_entropy[17]                      # nats; low = few token types
    report.layers[0].top_tokens[17]                         # [' Paris', ' Lyon', ...]
    plot_entropy_by_layer({"TopK": topk_report, "dense": dense_report}, "entropy.png")

A neuron (l, k) is unit k of the MLP hidden state of layer l that feeds the output matrix
(``blocks.l.mlp.hook_post``, ROME's key k, the unit steering adds to). Its activation mass on a
token type d is the sum of |a_{l,k}| over the occurrences of d in the text (|·|: SwiGLU hidden
states are signed; TopK-ReLU ones are ≥ 0, where |a| = a).

- Token entropy: p_{l,k,d} = mass_{l,k,d} / Σ_d mass_{l,k,d}; H = −Σ_d p log p (nats).
- Semantic entropy: the tokens that activate the neuron above a threshold (mean |a| per
  occurrence ≥ ``threshold`` × the neuron's largest mean, at most ``max_tokens``, seen at least
  ``min_count`` times); pairwise cosine similarities of their embeddings, histogrammed into
  ``n_bins`` bins over [−1, 1]; H = −Σ p log₂ p (bits). A neuron with a single such token has
  semantic entropy 0; a neuron that never fires has none. Special tokens (EOS) are never top
  tokens.
- For steering: ``self_logit_z`` = mean z-score of the top tokens among the direct logits
  U·w_k of the neuron's output vector w_k (does the neuron *write* its concept?), and
  ``delta_scale`` = mean ‖residual after layer l‖ / ‖w_k‖ (δ = 1 × scale adds a vector as long
  as the residual stream).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memlens import hooks
from memlens.errors import EmptyInput, UnknownName
from memlens.figures import finish_figure, pyplot
from memlens.topk_mlp import TopKError, topk_modules

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class LayerNeurons:
    """Entropies and top tokens of every neuron of one layer (lists indexed by unit k)."""

    layer: int
    is_topk: bool  # the layer's MLP activation is TopK
    token_entropy: list[float | None]  # H (nats) per neuron; None: never active
    semantic_entropy: list[float | None]  # H (bits) per neuron; None: never active
    top_tokens: list[list[str]]  # the above-threshold tokens, strongest first
    top_token_ids: list[list[int]]
    peak: list[float]  # largest mean |a| per occurrence over token types
    self_logit_z: list[float | None]  # mean z-score of the top tokens in U·w_k (see below)
    delta_scale: list[float]  # mean ‖resid_post_l‖ / ‖w_k‖: δ that writes one residual norm
    dead_fraction: float  # share of neurons with zero mass on the whole text

    @property
    def mean_token_entropy(self) -> float:
        return _mean(self.token_entropy)

    @property
    def mean_semantic_entropy(self) -> float:
        return _mean(self.semantic_entropy)


@dataclass
class NeuronReport:
    """Per-layer neuron statistics of one model on one text."""

    model: str
    n_tokens: int
    embedder: str  # "lm-input-embeddings" or the sentence-embedding model used
    settings: dict  # threshold, max_tokens, min_count, n_bins
    layers: list[LayerNeurons] = field(default_factory=list)

    def layer(self, layer: int) -> LayerNeurons:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise UnknownName(f"layer {layer} is not in this report (layers "
                          f"{[e.layer for e in self.layers]})")

    def summary(self) -> list[dict]:
        """Per layer: mean token / semantic entropy, dead fraction, whether TopK."""
        return [{"layer": e.layer, "is_topk": e.is_topk,
                 "mean_token_entropy": e.mean_token_entropy,
                 "mean_semantic_entropy": e.mean_semantic_entropy,
                 "dead_fraction": e.dead_fraction} for e in self.layers]

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict) -> NeuronReport:
        layers = [LayerNeurons(**entry) for entry in data["layers"]]
        return cls(model=data["model"], n_tokens=data["n_tokens"], embedder=data["embedder"],
                   settings=data["settings"], layers=layers)


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


@dataclass
class _Pass:
    """What one pass over the text collects."""

    mass: dict[int, torch.Tensor]  # layer → (vocab, d_ff): Σ_occurrences |a_{l,k}|
    count: torch.Tensor  # (vocab,) occurrences of each token type
    resid_norm: dict[int, float]  # layer → mean ‖hook_resid_post‖ over tokens


@torch.no_grad()
def activation_mass(
    model, blocks: torch.Tensor, layers: list[int], vocab_size: int, batch_size: int = 16
) -> _Pass:
    """mass[l] (vocab, d_ff) = Σ over occurrences of token d of |a_{l,k}|, the count of each
    token type, and the mean residual-stream norm after each layer, in one pass."""
    mass: dict[int, torch.Tensor] = {}
    norm_sum = dict.fromkeys(layers, 0.0)
    count = torch.zeros(vocab_size, dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def record_hidden(layer: int):
        def record(hidden: torch.Tensor) -> None:  # (B, T, d_ff)
            flat = hidden.detach().abs().float().flatten(0, -2).cpu()
            if layer not in mass:
                mass[layer] = torch.zeros(vocab_size, flat.shape[-1])
            mass[layer].index_add_(0, current["ids"], flat)

        return record

    def record_resid(layer: int):
        def record(resid: torch.Tensor) -> None:  # (B, T, d_model)
            norm_sum[layer] += resid.detach().float().norm(dim=-1).sum().item()

        return record

    points = {f"blocks.{layer}.mlp.hook_post": record_hidden(layer) for layer in layers}
    points.update({f"blocks.{layer}.hook_resid_post": record_resid(layer) for layer in layers})
    device = next(model.parameters()).device
    with hooks.hooked(model, points):
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            current["ids"] = batch.flatten().cpu()
            count.index_add_(0, current["ids"], torch.ones(batch.numel(), dtype=torch.float64))
            model(input_ids=batch.to(device), attention_mask=torch.ones_like(batch).to(device),
                  use_cache=False)
    n = max(1, blocks.numel())
    return _Pass(mass=mass, count=count,
                 resid_norm={layer: total / n for layer, total in norm_sum.items()})


def self_logit_z(w_out: torch.Tensor, unembed: torch.Tensor, token_ids: list[int]) -> float:
    """How strongly neuron output w_k (d_model,) promotes ``token_ids`` by the direct path:
    the mean z-score (over the vocabulary) of their logits U·w_k, ignoring the final norm."""
    logits = unembed.float() @ w_out.float()  # (vocab,)
    z = (logits - logits.mean()) / logits.std().clamp(min=1e-12)
    return float(z[token_ids].mean())


def token_entropy(mass: torch.Tensor) -> torch.Tensor:
    """H_k = −Σ_d p_{k,d} log p_{k,d} with p = mass / Σ_d mass, per neuron (NaN if no mass)."""
    total = mass.sum(0, keepdim=True)  # (1, d_ff)
    p = mass / total
    return -(torch.xlogy(p, p)).sum(0).where(total.squeeze(0) > 0, torch.tensor(math.nan))


def semantic_entropy(embeddings: torch.Tensor, n_bins: int = 20) -> float:
    """−Σ p log₂ p of the histogram of pairwise cosine similarities of ``embeddings`` (n, d)."""
    if len(embeddings) < 2:
        return 0.0
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sims = unit @ unit.T
    upper = sims[torch.triu_indices(len(unit), len(unit), offset=1).unbind()]
    hist = torch.histc(upper.clamp(-1, 1), bins=n_bins, min=-1.0, max=1.0)
    p = hist / hist.sum()
    return max(0.0, float(-(torch.xlogy(p, p)).sum() / math.log(2)))  # no -0.0


def _token_embeddings(handle, embedder: str | None) -> tuple[torch.Tensor, str]:
    """Embedding per vocabulary entry: the LM's input embeddings, or a sentence-embedding model."""
    if embedder is None:
        weight = handle.arch.embedding(handle.model).weight.detach().float().cpu()
        return weight, "lm-input-embeddings"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TopKError(f"embedder {embedder!r} needs the sentence-transformers package, which "
                        "is not installed; omit --embedder to use the LM's input embeddings") \
            from None
    model = SentenceTransformer(embedder, device="cpu")
    vocab = [handle.tokenizer.decode([i]) for i in range(len(handle.tokenizer))]
    return torch.as_tensor(model.encode(vocab, batch_size=256)), embedder


def neuron_report(
    handle,
    blocks: torch.Tensor,
    layers: list[int] | None = None,
    *,
    threshold: float = 0.5,
    max_tokens: int = 20,
    min_count: int = 3,
    n_bins: int = 20,
    embedder: str | None = None,
    batch_size: int = 16,
) -> NeuronReport:
    """Token entropy, semantic entropy and top tokens of every neuron in ``layers`` (all).

    ``blocks`` is a LongTensor (N, T) of token ids (see memlens.topk.data.text_blocks).

        report = neuron_report(handle, heldout)
        report.summary()        # [{'layer': 0, 'is_topk': True, 'mean_token_entropy': 2.1, ...}]
    """
    if blocks.numel() == 0:
        raise EmptyInput("no tokens to measure neurons on")
    layers = list(range(handle.n_layers)) if layers is None else layers
    vocab_size = handle.arch.embedding(handle.model).weight.shape[0]
    if int(blocks.max()) >= vocab_size:
        raise TopKError(f"token id {int(blocks.max())} is outside the model's vocabulary "
                        f"({vocab_size}); was the text tokenized with this model's tokenizer?")
    collected = activation_mass(handle.model, blocks, layers, vocab_size, batch_size)
    count = collected.count
    unembed = handle.arch.unembedding(handle.model).weight.detach().cpu()
    special = set(handle.tokenizer.all_special_ids)
    embeddings, embedder_name = _token_embeddings(handle, embedder)
    topk_layers = set(topk_modules(handle.model))
    report = NeuronReport(model=handle.ref, n_tokens=int(blocks.numel()), embedder=embedder_name,
                          settings={"threshold": threshold, "max_tokens": max_tokens,
                                    "min_count": min_count, "n_bins": n_bins})
    frequent = (count >= min_count).float()  # (vocab,): seen often enough to judge
    frequent[list(special)] = 0.0  # special tokens (EOS, padding) are no concept
    frequent = frequent.unsqueeze(1)  # (vocab, 1)
    for layer in layers:
        m = collected.mass[layer]  # (vocab, d_ff)
        w_out = handle.arch.get_edit_weight(handle.model, layer).cpu()  # (d_model, d_ff)
        out_norm = w_out.norm(dim=0).clamp(min=1e-12)  # ‖w_k‖
        h_token = token_entropy(m.double())
        mean_act = m.double() / count.clamp(min=1).unsqueeze(1) * frequent  # (vocab, d_ff)
        n_top = min(max_tokens, vocab_size)
        top_vals, top_ids = mean_act.topk(n_top, dim=0)  # (n_top, d_ff)
        names, ids, sem, peak, self_z = [], [], [], [], []
        for unit in range(m.shape[1]):
            vals, idx = top_vals[:, unit], top_ids[:, unit]
            peak.append(float(vals[0]))
            chosen = idx[vals >= threshold * vals[0]].tolist() if vals[0] > 0 else []
            ids.append(chosen)
            names.append([handle.tokenizer.decode([t]) for t in chosen])
            sem.append(semantic_entropy(embeddings[chosen], n_bins) if chosen else None)
            self_z.append(self_logit_z(w_out[:, unit], unembed, chosen) if chosen else None)
        h_list = [None if math.isnan(h) else float(h) for h in h_token.tolist()]
        dead = sum(h is None for h in h_list) / len(h_list)
        report.layers.append(LayerNeurons(
            layer=layer, is_topk=layer in topk_layers, token_entropy=h_list,
            semantic_entropy=sem, top_tokens=names, top_token_ids=ids, peak=peak,
            self_logit_z=self_z,
            delta_scale=(collected.resid_norm[layer] / out_norm).tolist(),
            dead_fraction=dead,
        ))
    return report


def plot_entropy_by_layer(reports: dict[str, NeuronReport],
                          path: str | Path | None = None) -> Path | Figure:
    """Mean token and semantic entropy per layer, one line per model; TopK layers shaded.

        plot_entropy_by_layer({"TopK": topk_report, "dense": dense_report}, "entropy.png")
        fig = plot_entropy_by_layer({"TopK": topk_report})     # no path: the Figure
    """
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for name, report in reports.items():
        xs = [e.layer for e in report.layers]
        axes[0].plot(xs, [e.mean_token_entropy for e in report.layers], marker="o", label=name)
        axes[1].plot(xs, [e.mean_semantic_entropy for e in report.layers], marker="o",
                     label=name)
        for entry in report.layers:
            if entry.is_topk:
                for ax in axes:
                    ax.axvspan(entry.layer - 0.5, entry.layer + 0.5, color="0.92", zorder=0)
    axes[0].set(title="token entropy (nats)", xlabel="layer", ylabel="mean over neurons")
    axes[1].set(title="semantic entropy (bits)", xlabel="layer")
    for ax in axes:
        ax.legend()
    fig.suptitle("neuron entropy by layer (shaded: TopK layers)")
    fig.tight_layout()
    return finish_figure(fig, path)
