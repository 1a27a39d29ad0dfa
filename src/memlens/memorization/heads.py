"""Which attention head ties memorized continuations to rare prefix tokens?

    result = head_analysis(handle, mp_ids, prefix_len=50)   # corpus frequencies from the organism
    result.tau                      # (n_layers, n_heads) Kendall τ(attention, token frequency)
    result.candidate                # (layer, head) with the most negative τ: the memorization head
    kq = kq_scores(handle, ids[0], *result.candidate)        # (T, T) pre-softmax scores

Stoehr et al. 2024 §4.3: from the first continuation position (the query at ``prefix_len − 1``,
whose output is the first continuation token), read each head's attention to the prefix tokens;
rank the prefix tokens by their corpus frequency (dense rank per paragraph, 0 = rarest). A head
whose attention falls as frequency rises (negative Kendall τ) and that puts its mass on the
rarest ranks is the candidate memorization head (paper: layer 1, head 2 of GPT-Neo 125M).
Position 0 is left out by default: most heads park attention there (attention sink).
Attention weights need eager attention (sdpa returns none); :func:`eager_attention` switches a
loaded model temporarily.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memlens import hooks
from memlens.arch import HookPoint
from memlens.errors import EmptyInput
from memlens.files import read_text
from memlens.memorization.data import PREFIX_LEN

RARE_RANKS = 3  # attention mass on the 3 rarest dense frequency ranks


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block (restores the previous choice)."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def token_frequencies(token_lists: Iterable[list[int]], vocab_size: int) -> torch.Tensor:
    """Counts (vocab_size,) of each token id over ``token_lists``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_lists:
        if ids:
            counts += torch.bincount(torch.tensor(ids), minlength=vocab_size)[:vocab_size]
    return counts


def corpus_frequencies(handle, texts: list[str] | None = None, *, chunk_chars: int = 20_000
                       ) -> torch.Tensor:
    """Token counts over ``texts``, by default the model directory's ``corpus.txt``."""
    if texts is None:
        path = handle.source_dir / "corpus.txt" if handle.source_dir else None
        if path is None or not path.is_file():
            raise EmptyInput(f"model {handle.ref!r} has no corpus.txt; pass corpus texts to "
                             "compute token frequencies")
        text = read_text(path, "corpus")
        texts = [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    tokenizer = handle.tokenizer
    lists = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    return token_frequencies(lists, int(handle.model.config.vocab_size))


def dense_rank(values: torch.Tensor) -> torch.Tensor:
    """Dense rank of ``values`` (ascending, equal values share a rank): 0 = smallest = rarest."""
    unique = torch.unique(values)  # sorted ascending
    return torch.searchsorted(unique, values)


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kendall's τ-b between two 1-D sequences (ties handled; 0.0 when either is constant)."""
    dx = torch.sign(x[:, None] - x[None, :]).double()
    dy = torch.sign(y[:, None] - y[None, :]).double()
    upper = torch.triu(torch.ones_like(dx, dtype=torch.bool), diagonal=1)
    concordance = (dx * dy)[upper].sum()
    pairs_x = (dx != 0)[upper].sum()
    pairs_y = (dy != 0)[upper].sum()
    denominator = torch.sqrt(pairs_x.double() * pairs_y.double())
    return 0.0 if denominator == 0 else float(concordance / denominator)


@torch.no_grad()
def prefix_attention(handle, ids: torch.Tensor, prefix_len: int = PREFIX_LEN,
                     query_pos: int | None = None) -> torch.Tensor:
    """Attention (N, n_layers, n_heads, prefix_len) from ``query_pos`` (default
    ``prefix_len − 1``) to each prefix token, read with eager attention."""
    query_pos = prefix_len - 1 if query_pos is None else query_pos
    model = handle.model
    device = next(model.parameters()).device
    with eager_attention(model):
        out = model(input_ids=ids[:, :query_pos + 1].to(device), output_attentions=True,
                    use_cache=False)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention weights even with eager attention")
    stacked = torch.stack([a[:, :, query_pos, :prefix_len] for a in out.attentions], dim=1)
    return stacked.float().cpu()


@dataclass
class HeadsResult:
    """Per-head statistics of attention vs corpus frequency of the prefix tokens."""

    tau: torch.Tensor  # (L, H) mean Kendall τ(attention, frequency) over paragraphs
    rare_mass: torch.Tensor  # (L, H) mean attention mass on the `rare_ranks` rarest ranks
    candidate: tuple[int, int]  # (layer, head) most negative τ
    rare_ranks: int
    query_pos: int
    skip_first: bool

    def to_dict(self) -> dict[str, Any]:
        return {"tau": self.tau.tolist(), "rare_mass": self.rare_mass.tolist(),
                "candidate": {"layer": self.candidate[0], "head": self.candidate[1]},
                "candidate_tau": float(self.tau[self.candidate]),
                "candidate_rare_mass": float(self.rare_mass[self.candidate]),
                "rare_ranks": self.rare_ranks, "query_pos": self.query_pos,
                "skip_first": self.skip_first}


def head_analysis(
    handle, ids: torch.Tensor, *, prefix_len: int = PREFIX_LEN,
    frequencies: torch.Tensor | None = None, rare_ranks: int = RARE_RANKS,
    skip_first: bool = True, query_pos: int | None = None,
) -> HeadsResult:
    """Kendall τ and rare-token attention mass of every head over paragraphs ``ids``.

    ``frequencies``: token counts (vocab,), by default :func:`corpus_frequencies` of the model's
    corpus. The candidate memorization head has the most negative mean τ (ties: larger mass).

    Example::

        result = head_analysis(handle, paragraph_tensor(mp))
        layer, head = result.candidate
    """
    if ids.shape[0] == 0:
        raise EmptyInput("head analysis needs at least one paragraph")
    freqs = corpus_frequencies(handle) if frequencies is None else frequencies
    attention = prefix_attention(handle, ids, prefix_len, query_pos)  # (N, L, H, P)
    start = 1 if skip_first else 0
    n, n_layers, n_heads, _ = attention.shape
    tau = torch.zeros(n, n_layers, n_heads)
    mass = torch.zeros(n, n_layers, n_heads)
    for i in range(n):
        f = freqs[ids[i, start:prefix_len]].double()
        rare = dense_rank(f) < rare_ranks
        for layer in range(n_layers):
            for head in range(n_heads):
                a = attention[i, layer, head, start:]
                tau[i, layer, head] = kendall_tau(a, f)
                mass[i, layer, head] = a[rare].sum()
    tau_mean, mass_mean = tau.mean(0), mass.mean(0)
    order = tau_mean.flatten() - 1e-6 * mass_mean.flatten()
    flat = int(order.argmin())
    return HeadsResult(tau_mean, mass_mean, (flat // n_heads, flat % n_heads), rare_ranks,
                       prefix_len - 1 if query_pos is None else query_pos, skip_first)


@torch.no_grad()
def kq_scores(handle, ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Causal KQ scores (T, T) of one head over one paragraph ``ids`` (T,): x_i W_Q^h (x_j
    W_K^h)ᵀ / √d_head of the attention input x (biases and rotary embeddings left out: the
    head's bilinear QK circuit). Future positions are -inf.

    Example::

        scores = kq_scores(handle, paragraph_tensor(mp)[0], layer=1, head=2)
    """
    model, arch = handle.model, handle.arch
    point = HookPoint(arch.module_name(layer, "attn"), "input")
    device = next(model.parameters()).device
    with hooks.capture(model, [point]) as cache:
        model(input_ids=ids[None].to(device), use_cache=False)
    x = cache[point][0].float()  # (T, d_model)
    w_q = arch.attn_head_view(model, layer, "q").float()  # (H, d_head, d_model)
    w_k = arch.attn_head_view(model, layer, "k").float()  # (H_kv, d_head, d_model)
    kv_head = head // (w_q.shape[0] // w_k.shape[0])
    q = x @ w_q[head].T  # (T, d_head)
    k = x @ w_k[kv_head].T
    scores = q @ k.T / q.shape[-1] ** 0.5
    causal = torch.ones_like(scores, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).cpu()
