"""What a causal trace restores, and the inputs every trace starts from (shared by the fast
algorithm, :mod:`memlens.trace.fast`, and the naive one, :mod:`memlens.trace.reference`).

    restoration("mlp", 5, n_layers=12, window=3)    # Restoration(restore={("mlp", 4..6)})
    inp = trace_inputs(handle, "Toulouse is a city in", "Toulouse", samples=10)
    inp.noise.shape                                  # (S, n_subject_tokens, d_model)

The kinds (hidden, mlp, attn, severed_mlp, severed_attn) are explained in
:mod:`memlens.trace.runs`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memlens.errors import MemlensError
from memlens.tokens import Span, subject_span, target_ids
from memlens.trace.noise import NoiseArg, NoiseSpec, draw_noise, resolve_noise

if TYPE_CHECKING:
    from memlens.model import ModelHandle

KINDS = ("hidden", "mlp", "attn")
SEVERED_KINDS = ("severed_mlp", "severed_attn")
ALL_KINDS = KINDS + SEVERED_KINDS

#: A site is a (component, layer) whose output can be restored or frozen at one token.
Site = tuple[str, int]
SITE_HOOKS = {
    "hidden": "blocks.{}.hook_resid_post",
    "mlp": "blocks.{}.hook_mlp_out",
    "attn": "blocks.{}.hook_attn_out",
}


def site_hook(site: Site) -> str:
    """Hook name of a site, e.g. ("mlp", 3) → "blocks.3.hook_mlp_out"."""
    component, layer = site
    return SITE_HOOKS[component].format(layer)


def window_layers(center: int, n_layers: int, window: int) -> range:
    """Layers restored together for window kinds: max(0, c − w//2) .. min(L, c + ⌈w/2⌉) − 1."""
    return range(max(0, center - window // 2), min(n_layers, center - (-window // 2)))


def depth_scaled_window(n_layers: int, paper_window: int = 10) -> int:
    """A paper's window of ``paper_window`` layers in 48 (GPT-2 XL), scaled to the model's depth
    (≥ 1). ROME's 10: 10 for 48 layers, 6 for 28 (GPT-J), 2 for 12, 1 for 6 — used to CHOOSE
    edit layers, where a window covering the whole model would make every layer's effect equal.
    Geva et al.'s attention-knockout window of 9 gives 5 for GPT-J, as that paper used."""
    return max(1, round(n_layers * paper_window / 48))


def default_window(n_layers: int) -> int:
    """The window a trace uses when none is given: the paper's 10 on models as deep as its own
    (GPT-J's 28 layers and more), :func:`depth_scaled_window` on shallower ones, where 10 layers
    would cover most of the model and flatten the MLP/attention curves (1 on the 6-layer
    organisms, 2 on GPT-2 small)."""
    return 10 if n_layers >= 28 else depth_scaled_window(n_layers)


@dataclass(frozen=True)
class Restoration:
    """One restored run at one token: sites written back to their clean values (``restore``)
    and sites held at their corrupted values (``freeze``, for severed runs; a site in both
    stays corrupted, as in the reference code)."""

    restore: frozenset[Site]
    freeze: frozenset[Site] = frozenset()


def restoration(kind: str, layer: int, n_layers: int, window: int) -> Restoration:
    """The restoration that ``kind`` performs for ``layer`` (see the module docstring)."""
    if kind == "hidden":
        return Restoration(frozenset({("hidden", layer)}))
    if kind in ("mlp", "attn"):
        return Restoration(frozenset((kind, j) for j in window_layers(layer, n_layers, window)))
    if kind in SEVERED_KINDS:
        frozen = kind.removeprefix("severed_")
        return Restoration(frozenset({("hidden", layer)}),
                           frozenset((frozen, j) for j in range(n_layers)))
    raise MemlensError(f"unknown trace kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """Validate kind names ("all" expands to hidden, mlp, attn)."""
    out: list[str] = []
    for kind in kinds:
        names = KINDS if kind == "all" else (kind,)
        for name in names:
            if name not in ALL_KINDS:
                raise MemlensError(f"unknown trace kind {name!r}; expected one of "
                                   f"{', '.join(ALL_KINDS)} or 'all'")
            if name not in out:
                out.append(name)
    if not out:
        raise MemlensError("no trace kind given")
    return tuple(out)


# ── inputs shared by the fast and the naive algorithm ────────────────────────


@dataclass
class TraceInputs:
    """Everything that defines a trace before any restoration."""

    input_ids: torch.Tensor  # (1, T)
    span: Span  # subject tokens [start, end)
    answer_id: int  # token whose probability is the score
    noise_spec: NoiseSpec
    noise: torch.Tensor  # (S, n_subject_tokens, d_model): ν·ε added to the subject embeddings
    p_clean: float  # P(answer) of the clean run

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def trace_inputs(handle: ModelHandle, prompt: str, subject: str, *, samples: int = 10,
                 noise: NoiseArg | NoiseSpec = None, seed: int = 0,
                 answer: str | None = None) -> TraceInputs:
    """Tokenize, locate the subject, run the clean model once, fix the answer and draw noise."""
    if samples < 1:
        raise MemlensError(f"samples must be ≥ 1, got {samples}")
    span = subject_span(handle.tokenizer, prompt, subject)
    input_ids = handle.encode([prompt]).input_ids
    spec = noise if isinstance(noise, NoiseSpec) else resolve_noise(handle, noise, [subject])
    with torch.no_grad():
        logits = handle.model(input_ids=input_ids, use_cache=False).logits[0, -1]
    probs = torch.softmax(logits, dim=-1)
    if answer is None:
        answer_id = int(probs.argmax())
    else:
        answer_id = target_ids(handle.tokenizer, answer)[0]
    eps = draw_noise(spec, samples, span.end - span.start, handle.d_model, seed=seed,
                     dtype=handle.dtype, device=handle.device)
    return TraceInputs(input_ids, span, answer_id, spec, eps, float(probs[answer_id]))


def add_noise_hook(noise_rows: torch.Tensor, span: Span, offset: int, length: int):
    """Hook fn adding ``noise_rows`` (B, n_subj, d) to the subject positions of an embedding
    output that covers absolute positions ``offset .. offset+length−1``."""
    lo, hi = max(span.start, offset), min(span.end, offset + length)
    if lo >= hi:
        return None

    def corrupt(embedded: torch.Tensor) -> torch.Tensor:
        out = embedded.clone()
        out[:, lo - offset:hi - offset] += noise_rows[:, lo - span.start:hi - span.start]
        return out

    return corrupt
