"""Attention knockout (Geva et al. 2023, §4): at which layers the last position reads a fact.

    result = knockout_fact(handle, "Toulouse is a city in", "Toulouse")
    result.relative["subject"]       # (L,): (p_blocked − p_clean) / p_clean, window centred at l
    avg = average_knockout(handle, load_facts("known_facts.json"), n=100)
    avg.strongest()                  # per source set: the layer where blocking hurts most
    fig = plot_knockout(avg)

    with block_attention(handle, {3: cut}):   # cut: (B or 1, T, T) bool, True = edge removed
        handle.model(input_ids=ids, use_cache=False)

For a prompt whose last position N predicts the answer a, a *knockout* removes the attention
edges from N to a set of source positions S in a window of k consecutive layers
ℓ−k/2 … ℓ+k/2 (clipped to the model, as causal tracing's window, see
:func:`memlens.trace.sites.window_layers`): in those layers, no head of N may attend to S; every
other edge is left alone. The score is the relative change of the answer's probability at N,
(p_blocked(a) − p_clean(a)) / p_clean(a), with a the clean run's top token. Source sets
(:data:`SOURCES`):

| name          | positions                                                      |
|---------------|----------------------------------------------------------------|
| ``subject``     | the subject's tokens (the last position excluded if it is one)  |
| ``non_subject`` | every other position before the last                            |
| ``last``        | the last position itself                                        |

An empty source set (e.g. no token between the subject and the end) gives NaN, not 0. The
default window is the paper's 9 layers of GPT-2 XL's 48, scaled to the model's depth (5 for
GPT-J's 28, as the paper; 1 on 6-layer organisms).

**How an edge is removed.** A forward pre-hook on the attention module of each knocked-out
layer rewrites the mask the block hands it (keyword :attr:`ArchSpec.attn_mask_kwarg
<memlens.arch.ArchSpec.attn_mask_kwarg>`, ``attention_mask`` in all supported architectures).
Transformers 5 builds that mask once per forward: eager attention gets an additive float mask
(B, 1, Q, K) with the dtype's minimum at forbidden edges (GPT-Neo, which has only eager
attention, adds it to its own causal ``bias``); sdpa gets a boolean mask (True = attend) or,
without padding, None (then sdpa runs ``is_causal``). The hook writes the dtype's minimum into
the additive mask, or False into the boolean one; for None it builds the causal boolean mask
(sdpa) or additive mask (eager) and removes the edges from it. Blocked weights become exactly
zero after the softmax. Layers without removed edges get no hook, so blocking nothing is the
clean run, bit for bit. Other attention implementations (flash, flex) are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlens.cache import cache_dir
from memlens.errors import EmptyInput, InvalidArgument, MemlensError
from memlens.tokens import Span, subject_span, target_ids
from memlens.trace.average import KnownFacts, extreme_layer
from memlens.trace.runs import FactRun
from memlens.trace.sites import depth_scaled_window, window_layers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from memlens.model import ModelHandle

SOURCES = ("subject", "non_subject", "last")
SOURCE_LABELS = {"subject": "subject", "non_subject": "non-subject", "last": "last"}
SOURCE_COLOURS = {"subject": "tab:green", "non_subject": "tab:blue", "last": "tab:orange"}
#: Geva et al. block 9 layers at a time in GPT-2 XL (48 layers).
PAPER_WINDOW = 9
SUPPORTED_ATTENTION = ("eager", "sdpa")


def default_knockout_window(n_layers: int) -> int:
    """The paper's window of 9 layers in 48, scaled to ``n_layers`` (≥ 1)."""
    return depth_scaled_window(n_layers, PAPER_WINDOW)


# ── removing attention edges ────────────────────────────────────────────────


@contextmanager
def block_attention(handle: ModelHandle, cuts: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Inside the ``with`` block, layer l's attention cannot use the edges where ``cuts[l]``
    (bool, (B, Q, K) or (1, Q, K): query position × key position) is True.

    Every forward pass must run without a KV cache (``use_cache=False``), so that Q = K = the
    number of tokens. Hooks are removed on exit, also after an error.

        cut = torch.zeros(1, T, T, dtype=torch.bool)
        cut[0, T - 1, :T - 1] = True                     # the last token sees only itself
        with block_attention(handle, {layer: cut for layer in range(handle.n_layers)}):
            logits = handle.model(input_ids=ids, use_cache=False).logits
    """
    implementation = getattr(handle.config, "_attn_implementation", None) or "eager"
    if cuts and implementation not in SUPPORTED_ATTENTION:
        raise InvalidArgument(
            f"attention knockout supports eager and sdpa attention, not {implementation!r}; "
            "load the model with attn_implementation='eager' or 'sdpa'")
    key = handle.arch.spec.attn_mask_kwarg
    handles = []
    try:
        for layer, cut in cuts.items():
            module = handle.model.get_submodule(handle.arch.module_name(layer, "attn"))
            hook = _mask_hook(cut.bool(), key, implementation, handle.arch.model_type)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _mask_hook(cut: torch.Tensor, key: str, implementation: str, model_type: str):
    def hook(module, args, kwargs):
        if key not in kwargs:
            raise MemlensError(
                f"the attention modules of {model_type} receive no {key!r} keyword, so memlens "
                "cannot remove attention edges; set ArchSpec.attn_mask_kwarg to the keyword "
                "under which the block passes the attention mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = cut_mask(kwargs[key], cut.to(hidden.device), implementation, hidden.dtype)
        return args, {**kwargs, key: mask}

    return hook


def cut_mask(mask: torch.Tensor | None, cut: torch.Tensor, implementation: str,
             dtype: torch.dtype) -> torch.Tensor:
    """The attention mask ``mask`` (as a block hands it to its attention; None = causal) with
    the edges of ``cut`` ((B, Q, K) bool, True = remove) removed, in the same format: boolean
    (True = attend) for sdpa, additive float (dtype minimum = forbidden) otherwise."""
    q_len, k_len = cut.shape[-2:]
    if mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=cut.device
                            ).tril(k_len - q_len)[None, None]
        if implementation == "sdpa":
            return causal & ~cut[:, None]
        mask = torch.zeros(causal.shape, dtype=dtype, device=cut.device).masked_fill(
            ~causal, torch.finfo(dtype).min)
    if not torch.is_tensor(mask) or mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, k_len):
        raise MemlensError(
            f"cannot remove attention edges: expected a (batch, 1, {q_len}, {k_len}) attention "
            f"mask, got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))} (run the "
            "forward pass without a KV cache, use_cache=False)")
    if mask.dtype == torch.bool:
        return mask & ~cut[:, None]
    return torch.where(cut[:, None], torch.finfo(mask.dtype).min, mask)


# ── one fact ─────────────────────────────────────────────────────────────────


def source_positions(n_tokens: int, span: Span) -> dict[str, list[int]]:
    """Positions of each source set of :data:`SOURCES` in a prompt of ``n_tokens`` tokens."""
    last = n_tokens - 1
    subject = [t for t in range(span.start, span.end) if t != last]
    return {"subject": subject,
            "non_subject": [t for t in range(last) if t not in subject],
            "last": [last]}


@dataclass
class KnockoutResult(FactRun):
    """Attention knockout of one fact. ``p_blocked[source][l]`` = P(answer) with the edges
    last → ``source`` removed in the window of layers centred on l (NaN: empty source set)."""

    window: int  # k, layers blocked together
    sources: dict[str, list[int]]  # source set → positions
    p_blocked: dict[str, np.ndarray] = field(default_factory=dict)  # source → (n_layers,)

    @property
    def n_layers(self) -> int:
        return len(next(iter(self.p_blocked.values())))

    @property
    def relative(self) -> dict[str, np.ndarray]:
        """(p_blocked − p_clean) / p_clean per source set and window centre."""
        return {s: (p - self.p_clean) / self.p_clean for s, p in self.p_blocked.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``knockout.json`` format)."""
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": self.tokens,
            "input_ids": self.input_ids, "subject_range": list(self.subject_range),
            "answer": self.answer, "answer_id": self.answer_id, "p_clean": self.p_clean,
            "window": self.window, "sources": self.sources,
            "p_blocked": {s: _nan_to_none(p) for s, p in self.p_blocked.items()},
            "relative": {s: _nan_to_none(r) for s, r in self.relative.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KnockoutResult:
        """Inverse of :meth:`to_json`."""
        fields = {k: data[k] for k in ("prompt", "subject", "tokens", "input_ids", "answer",
                                       "answer_id", "p_clean", "window", "sources")}
        p_blocked = {s: np.array([np.nan if x is None else x for x in p], dtype=float)
                     for s, p in data["p_blocked"].items()}
        return cls(**fields, subject_range=tuple(data["subject_range"]), p_blocked=p_blocked)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(x) else float(x) for x in values]


def knockout_fact(handle: ModelHandle, prompt: str, subject: str, *, window: int | None = None,
                  answer: str | None = None, batch_size: int = 64) -> KnockoutResult:
    """Attention knockout of one fact: P(answer) when the last position cannot attend to each
    source set in each window of ``window`` layers (default :func:`default_knockout_window`).

    ``answer``: the token scored (default: the clean run's top token). All knockouts of a
    fact run as one batch (chunks of ``batch_size`` rows) without a KV cache.

        result = knockout_fact(handle, "Toulouse is a city in", "Toulouse")
        result.relative["subject"].argmin()     # the window centre where blocking hurts most
    """
    L = handle.n_layers
    window = default_knockout_window(L) if window is None else window
    if window < 1:
        raise InvalidArgument(f"window must be ≥ 1, got {window}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be ≥ 1, got {batch_size}")
    span = subject_span(handle.tokenizer, prompt, subject)
    input_ids = handle.encode([prompt]).input_ids  # (1, T)
    T = int(input_ids.shape[1])
    last = T - 1
    sources = source_positions(T, span)
    model = handle.model
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[0, -1]
    probs = torch.softmax(logits, dim=-1)
    answer_id = int(probs.argmax()) if answer is None else target_ids(handle.tokenizer,
                                                                      answer)[0]
    rows = [(name, centre) for name in SOURCES if sources[name] for centre in range(L)]
    p_blocked = {name: np.full(L, np.nan) for name in SOURCES}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        cuts = {}
        for layer in range(L):
            cut = torch.zeros(len(chunk), T, T, dtype=torch.bool, device=handle.device)
            for r, (name, centre) in enumerate(chunk):
                if layer in window_layers(centre, L, window):
                    cut[r, last, sources[name]] = True
            if cut.any():
                cuts[layer] = cut
        with torch.no_grad(), block_attention(handle, cuts):
            logits = model(input_ids=input_ids.expand(len(chunk), -1), use_cache=False,
                           logits_to_keep=1).logits[:, -1]
        p = torch.softmax(logits, dim=-1)[:, answer_id].tolist()
        for (name, centre), value in zip(chunk, p, strict=True):
            p_blocked[name][centre] = value
    ids = input_ids[0].tolist()
    return KnockoutResult(
        prompt=prompt, subject=subject, tokens=[handle.tokenizer.decode([t]) for t in ids],
        input_ids=ids, subject_range=(span.start, span.end),
        answer=handle.tokenizer.decode([answer_id]), answer_id=answer_id,
        p_clean=float(probs[answer_id]), window=window, sources=sources, p_blocked=p_blocked)


# ── many facts ───────────────────────────────────────────────────────────────


@dataclass
class AverageKnockout:
    """Mean relative change of P(answer) per source set and window centre, over known facts."""

    n_layers: int
    window: int
    relative: dict[str, np.ndarray]  # source → (n_layers,), mean over facts with that set
    n_per_source: dict[str, int]  # facts whose source set is not empty
    p_clean: float  # mean over facts
    n_facts: int
    n_skipped_wrong: int  # the model's top token was not the fact's attribute
    n_skipped_invalid: int  # subject not in the prompt, or empty
    skipped: list[dict[str, str]] = field(default_factory=list)  # prompt, subject, reason

    def strongest(self) -> dict[str, dict[str, float | int]]:
        """Per source set, the window centre where blocking lowers P(answer) the most, and the
        mean relative change there: ``{"subject": {"layer": 2, "relative": -0.41}, ...}``."""
        return {name: dict(zip(("layer", "relative"), extreme_layer(curve, lowest=True),
                               strict=True))
                for name, curve in self.relative.items()}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``knockout_avg.json``)."""
        return {
            "n_layers": self.n_layers, "window": self.window, "sources": list(SOURCES),
            "relative": {s: _nan_to_none(r) for s, r in self.relative.items()},
            "n_per_source": self.n_per_source, "p_clean": self.p_clean,
            "n_facts": self.n_facts, "n_skipped_wrong": self.n_skipped_wrong,
            "n_skipped_invalid": self.n_skipped_invalid, "skipped": self.skipped,
            "strongest": self.strongest(),
        }


def knockout_cache(handle: ModelHandle) -> Path:
    """The shared resume file of ``handle``'s knocked-out facts:
    ``$MEMLENS_HOME/knockout/<fingerprint>.jsonl`` (records keyed by settings and fact)."""
    return cache_dir("knockout") / f"{handle.fingerprint()}.jsonl"


def average_knockout(handle: ModelHandle, facts: Sequence[dict[str, str]], *,
                     n: int | None = None, window: int | None = None, progress: bool = True,
                     resume: str | Path | None = None) -> AverageKnockout:
    """Knock out the first ``n`` facts (all if None) and average the relative changes.

    Facts whose ``attribute`` is not the model's top next token are skipped and counted, as
    are facts whose subject is not in the prompt. With ``resume`` (a .jsonl path), each fact's
    result is appended as it completes and facts already there are not run again.

        avg = average_knockout(handle, load_facts("known_facts.json"), n=100)
        avg.strongest()["subject"]        # {"layer": ..., "relative": ...}
    """
    facts = list(facts)[:n] if n is not None else list(facts)
    if not facts:
        raise EmptyInput("no facts to knock out")
    L = handle.n_layers
    window = default_knockout_window(L) if window is None else window
    settings = json.dumps([handle.fingerprint(), "knockout", window])
    curves: dict[str, list[np.ndarray]] = {name: [] for name in SOURCES}
    p_clean = []

    def run(prompt: str, subject: str, fact: dict[str, str]) -> dict[str, Any]:
        return knockout_fact(handle, prompt, subject, window=window).to_json()

    runs = KnownFacts(handle, facts, run, label="knocking out facts", progress=progress,
                      settings=settings, resume=resume)
    for data in runs:
        result = KnockoutResult.from_json(data)
        p_clean.append(result.p_clean)
        for name, curve in result.relative.items():
            if not np.all(np.isnan(curve)):
                curves[name].append(curve)
    relative = {name: np.mean(c, axis=0) if c else np.full(L, np.nan)
                for name, c in curves.items()}
    return AverageKnockout(
        n_layers=L, window=window, relative=relative,
        n_per_source={name: len(c) for name, c in curves.items()},
        p_clean=float(np.mean(p_clean)) if p_clean else float("nan"), n_facts=len(p_clean),
        n_skipped_wrong=runs.n_skipped_wrong, n_skipped_invalid=runs.n_skipped_invalid,
        skipped=runs.skipped)


# ── figure ───────────────────────────────────────────────────────────────────


def plot_knockout(result: KnockoutResult | AverageKnockout, *, title: str = "") -> Figure:
    """Relative change of P(answer) (%) against the window's centre layer, one line per
    source set, as Geva et al. (2023) Fig. 2; for one fact or the average over facts."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0))
    ax = fig.subplots()
    layers = np.arange(result.n_layers)
    for name, curve in result.relative.items():
        if not np.all(np.isnan(curve)):
            ax.plot(layers, 100 * curve, marker="o", color=SOURCE_COLOURS[name],
                    label=f"last ↛ {SOURCE_LABELS[name]}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"layer (centre of a window of {result.window})")
    ax.set_ylabel("% change in p(answer)")
    if not title:
        title = (f"attention knockout, mean over {result.n_facts} facts"
                 if isinstance(result, AverageKnockout)
                 else f"attention knockout: {result.prompt!r} → {result.answer!r}")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(layers[::max(1, result.n_layers // 12)])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
