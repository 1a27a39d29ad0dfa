"""Causal tracing of one fact: clean, corrupted and restored runs (Meng et al. 2022, §2).

    result = trace_fact(handle, "Toulouse is a city in", "Toulouse")
    result.scores["mlp"]          # (tokens, layers): P(answer) with a window of MLPs restored
    result.p_clean, result.p_corrupted, result.answer

Three runs per fact. The *clean* run reads the prompt as is and fixes the answer (the clean
run's top token unless given). The *corrupted* run adds noise ν·ε (:mod:`memlens.trace.noise`)
to the subject tokens' embeddings, S samples. A *restored* run is a corrupted run in which the
clean value of one site at one token is written back:

| kind           | written back at token t for "layer" l                                  |
|----------------|------------------------------------------------------------------------|
| ``hidden``     | the output of block l (the residual stream h_t^(l))                    |
| ``mlp``        | MLP outputs of layers max(0, l − w/2) .. min(L, l + w/2) − 1 (w=window) |
| ``attn``       | attention outputs of the same window of layers                         |
| ``severed_mlp``  | h_t^(l), while every MLP output at t stays at its corrupted value    |
| ``severed_attn`` | h_t^(l), while every attention output at t stays corrupted           |

The score of a run is P(answer) at the last position, averaged over the S samples.

**Speed.** The naive algorithm (:mod:`memlens.trace.reference`) runs the whole model once per
(token, layer, kind). Here the clean and corrupted runs are computed once, and for each token t
all restorations of every kind run in one batched forward pass (chunked by ``batch_size``
rows), which only computes positions ≥ t: positions < t are unchanged by a restoration at t, so
their keys/values come from the corrupted run's KV cache (Hugging Face's own incremental
decoding, so every architecture works). Restoring at layer l cannot change blocks below l:
each block runs only on the rows whose restoration can change it (the block's ``forward`` is
wrapped for the pass; its KV-cache layer and batch-shaped arguments are narrowed to those
rows), the other rows take the corrupted run's block output. Restorations before the subject
are no-ops (the noise cannot reach them): their score is p_corrupted without a forward pass.
Identical restorations (e.g. the clipped MLP windows of a shallow model) are computed once.
Only the last position's logits are computed. The result equals the naive loop (tests check
1e-5 on every architecture).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlens import hooks
from memlens.errors import MemlensError
from memlens.model import kv_cache_kwargs, kv_cache_of
from memlens.tokens import Span, subject_span, target_ids
from memlens.trace.noise import NoiseArg, NoiseSpec, draw_noise, resolve_noise

if TYPE_CHECKING:
    from memlens.model import ModelHandle

KINDS = ("hidden", "mlp", "attn")
SEVERED_KINDS = ("severed_mlp", "severed_attn")
ALL_KINDS = KINDS + SEVERED_KINDS

#: A site is a (component, layer) whose output can be restored or frozen at one token.
Site = tuple[str, int]
_HOOK_NAMES = {
    "hidden": "blocks.{}.hook_resid_post",
    "mlp": "blocks.{}.hook_mlp_out",
    "attn": "blocks.{}.hook_attn_out",
}


def site_hook(site: Site) -> str:
    """Hook name of a site, e.g. ("mlp", 3) → "blocks.3.hook_mlp_out"."""
    component, layer = site
    return _HOOK_NAMES[component].format(layer)


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


# ── results ──────────────────────────────────────────────────────────────────


@dataclass
class FactRun:
    """What every per-fact experiment records first: the prompt as tokens, where the subject
    is, the answer token and its probability in the clean run."""

    prompt: str
    subject: str
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]  # [first, last + 1)
    answer: str
    answer_id: int
    p_clean: float  # P(answer), clean run


@dataclass
class TraceResult(FactRun):
    """A causal trace of one fact. ``scores[kind][t, l]`` = P(answer) after restoring (t, l).

    Unrestored entries (positions not traced) are NaN (``null`` in JSON).
    """

    p_corrupted: float  # P(answer), corrupted run, mean over samples
    noise: float  # ν
    noise_dist: str
    samples: int
    seed: int
    window: int
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # kind → (T, L)

    @property
    def total_effect(self) -> float:
        """TE = p_clean − p_corrupted."""
        return self.p_clean - self.p_corrupted

    def indirect_effect(self, kind: str) -> np.ndarray:
        """IE[t, l] = p_restored − p_corrupted for ``kind``."""
        return self.scores[kind] - self.p_corrupted

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``trace.json`` format, see docs/tracing.md)."""
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": self.tokens,
            "input_ids": self.input_ids, "subject_range": list(self.subject_range),
            "answer": self.answer, "answer_id": self.answer_id,
            "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
            "total_effect": self.total_effect,
            "noise": self.noise, "noise_dist": self.noise_dist, "samples": self.samples,
            "seed": self.seed, "window": self.window, "kinds": list(self.scores),
            "scores": {k: _nan_to_none(v) for k, v in self.scores.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceResult:
        """Inverse of :meth:`to_json`."""
        fields = {k: data[k] for k in (
            "prompt", "subject", "tokens", "input_ids", "answer", "answer_id", "p_clean",
            "p_corrupted", "noise", "noise_dist", "samples", "seed", "window")}
        scores = {k: np.array(v, dtype=float) for k, v in data["scores"].items()}
        return cls(**fields, subject_range=tuple(data["subject_range"]), scores=scores)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(x) else float(x) for x in row] for row in matrix]


# ── the fast algorithm ───────────────────────────────────────────────────────


@dataclass
class _Runs:
    """Clean site values (T, d) and corrupted ones (S, T, d), read once per trace."""

    clean: dict[Site, torch.Tensor]
    corrupted: dict[Site, torch.Tensor]  # every block output, and the frozen sites
    p_corrupted: float
    block_tuple_len: int  # blocks return a tuple of this length (0: a bare tensor)


def _base_runs(handle: ModelHandle, inp: TraceInputs, freeze_sites: set[Site]) -> _Runs:
    model, n_layers = handle.model, handle.n_layers
    sites = [(c, layer) for c in _HOOK_NAMES for layer in range(n_layers)]
    structure: list[int] = []
    block = handle.arch.blocks(model)[0]
    probe = block.register_forward_hook(
        lambda module, args, out: structure.append(len(out) if isinstance(out, tuple) else 0))
    try:
        with torch.no_grad():
            with hooks.capture(model, [site_hook(s) for s in sites]) as cache:
                model(input_ids=inp.input_ids, use_cache=False, logits_to_keep=1)
            clean = {s: cache[site_hook(s)][0] for s in sites}
            ids = inp.input_ids.expand(inp.samples, -1)
            corrupt = add_noise_hook(inp.noise, inp.span, 0, inp.n_tokens)
            kept = sorted(freeze_sites | {("hidden", layer) for layer in range(n_layers)})
            with hooks.hooked(model, {"hook_embed": corrupt}), \
                    hooks.capture(model, [site_hook(s) for s in kept]) as cache:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            corrupted = {s: cache[site_hook(s)] for s in kept}
    finally:
        probe.remove()
    p_corrupted = float(torch.softmax(logits, dim=-1)[:, inp.answer_id].mean())
    return _Runs(clean, corrupted, p_corrupted, structure[0])


def _first_changed_block(rest: Restoration) -> int:
    """The lowest block whose output a restoration can change: blocks below it (and, when the
    lowest restored site is a block output, that block too) output the corrupted values."""
    layer = min(layer for _, layer in rest.restore)
    inside = any(c != "hidden" and site_layer == layer for c, site_layer in rest.restore)
    return layer if inside else layer + 1


@contextmanager
def _skip_unchanged_blocks(handle: ModelHandle, runs: _Runs, token: int,
                           sample_of_row: torch.Tensor, computed: list[torch.Tensor], past):
    """Run block j only on the rows ``computed[j]`` (those whose restoration can change it);
    the other rows get the corrupted run's block output, which is what they would compute.

    Each block's KV-cache layer is narrowed to its computed rows; tensors of the block's
    arguments with the batch as first dimension (e.g. 4-D masks) are narrowed alike.
    """
    blocks = handle.arch.blocks(handle.model)
    batch = int(sample_of_row.shape[0])
    replacements = []
    for j, block in enumerate(blocks):
        rows = computed[j].to(handle.device)
        if len(rows) == batch:
            continue
        if past is not None and len(rows):
            past.layers[j].reorder_cache(rows)
        corrupted = runs.corrupted[("hidden", j)][sample_of_row, token:]
        replacements.append((block, _row_subset_forward(block.forward, rows, corrupted,
                                                        runs.block_tuple_len)))
    with hooks.forwards_replaced(replacements):
        yield


def _row_subset_forward(forward, rows: torch.Tensor, corrupted: torch.Tensor, tuple_len: int):
    batch = corrupted.shape[0]

    def take(value):
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch:
            return value[rows]
        if isinstance(value, tuple):
            return tuple(take(v) for v in value)
        return value

    def subset_forward(*args, **kwargs):
        out = corrupted.clone()
        extra: tuple = (None,) * max(0, tuple_len - 1)
        if len(rows):
            result = forward(*(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
            hidden = result[0] if isinstance(result, tuple) else result
            out[rows] = hidden.to(out.dtype)
        return (out, *extra) if tuple_len else out

    return subset_forward


def _restored_scores(handle: ModelHandle, inp: TraceInputs, runs: _Runs, token: int,
                     restorations: Sequence[Restoration]) -> list[float]:
    """P(answer) of each restoration at ``token``, in one forward pass over positions ≥ token.

    Rows are laid out restoration-major: row r·S + s is restoration r with noise sample s.
    """
    model, S = handle.model, inp.samples
    R = len(restorations)
    sample_of_row = torch.arange(R * S, device=handle.device) % S
    suffix = inp.input_ids[:, token:].expand(R * S, -1)
    past = _corrupted_prefix_cache(handle, inp, token, sample_of_row)
    first_block = torch.tensor([_first_changed_block(r) for r in restorations]
                               ).repeat_interleave(S)
    # rows computed by block j; the others keep the corrupted block output
    computed = [torch.nonzero(first_block <= j).flatten() for j in range(handle.n_layers)]
    fns: dict[str, Any] = {}
    corrupt = add_noise_hook(inp.noise[sample_of_row], inp.span, token, suffix.shape[1])
    if corrupt is not None:
        fns["hook_embed"] = corrupt
    for site in sorted({s for r in restorations for s in r.restore | r.freeze}):
        component, layer = site
        restore_rows = _rows(restorations, S, lambda r, site=site: site in r.restore
                             and site not in r.freeze)
        freeze_rows = _rows(restorations, S, lambda r, site=site: site in r.freeze)
        if component != "hidden":  # inside block `layer`: it sees only its computed rows
            freeze_rows = freeze_rows[torch.isin(freeze_rows, computed[layer])]
        clean = runs.clean[site][token]
        frozen = (runs.corrupted[site][sample_of_row[freeze_rows], token]
                  if len(freeze_rows) else None)
        if component != "hidden":
            restore_rows = torch.searchsorted(computed[layer], restore_rows)
            freeze_rows = torch.searchsorted(computed[layer], freeze_rows)
        fns[site_hook(site)] = _write_rows(restore_rows, clean, freeze_rows, frozen)
    with torch.no_grad(), hooks.hooked(model, fns), \
            _skip_unchanged_blocks(handle, runs, token, sample_of_row, computed, past):
        logits = model(input_ids=suffix, use_cache=past is not None, logits_to_keep=1,
                       **kv_cache_kwargs(model, past)).logits[:, -1]
    probs = torch.softmax(logits, dim=-1)[:, inp.answer_id].reshape(R, S).mean(dim=1)
    return probs.tolist()


def _rows(restorations: Sequence[Restoration], samples: int, predicate) -> torch.Tensor:
    picked = [r * samples + s for r, rest in enumerate(restorations) if predicate(rest)
              for s in range(samples)]
    return torch.tensor(picked, dtype=torch.long)


def _write_rows(restore_rows: torch.Tensor, clean: torch.Tensor, freeze_rows: torch.Tensor,
                frozen: torch.Tensor | None):
    """Hook fn writing the clean vector into ``restore_rows`` and the corrupted vectors
    ``frozen`` into ``freeze_rows`` at the suffix's first position (the restored token)."""

    def write(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        if len(restore_rows):
            out[restore_rows.to(out.device), 0] = clean.to(out.dtype)
        if frozen is not None:
            out[freeze_rows.to(out.device), 0] = frozen.to(out.dtype)
        return out

    return write


def _corrupted_prefix_cache(handle: ModelHandle, inp: TraceInputs, token: int,
                            sample_of_row: torch.Tensor):
    """KV cache of the corrupted run over positions < ``token``, one row per batch row."""
    if token == 0:
        return None
    prefix = inp.input_ids[:, :token].expand(inp.samples, -1)
    corrupt = add_noise_hook(inp.noise, inp.span, 0, token)
    with torch.no_grad(), hooks.hooked(handle.model, {"hook_embed": corrupt} if corrupt else {}):
        past = kv_cache_of(handle.model(input_ids=prefix, use_cache=True, logits_to_keep=1))
    if past is None or not hasattr(past, "reorder_cache"):
        raise MemlensError(f"{handle.arch.model_type} returned no reorderable KV cache; "
                           "causal tracing needs one (use_cache=True)")
    past.reorder_cache(sample_of_row)
    return past


def trace_fact(handle: ModelHandle, prompt: str, subject: str, *,
               kinds: Sequence[str] = KINDS, samples: int = 10,
               noise: NoiseArg | NoiseSpec = None, seed: int = 0, window: int | None = None,
               answer: str | None = None, positions: Sequence[int] | None = None,
               batch_size: int = 512) -> TraceResult:
    """Causal trace of one fact: P(answer) after restoring each (token, layer), per kind.

    ``kinds``: any of hidden, mlp, attn, severed_mlp, severed_attn ("all" = the first three).
    ``noise``: None (ν = 3σ of subject embeddings, see :func:`resolve_noise`), a float ν, or
    "uniform". ``window``: layers restored together for mlp/attn (default
    :func:`default_window`). ``answer``: the token scored (default: the clean run's top token).
    ``positions``: tokens to trace (default: all; others are NaN). ``batch_size``: rows per
    forward pass (restorations × samples).

        result = trace_fact(handle, "Toulouse is a city in", "Toulouse", kinds=("mlp",))
        result.scores["mlp"].shape      # (n_tokens, n_layers)
    """
    kinds = check_kinds(kinds)
    window = default_window(handle.n_layers) if window is None else window
    if window < 1:
        raise MemlensError(f"window must be ≥ 1, got {window}")
    inp = trace_inputs(handle, prompt, subject, samples=samples, noise=noise, seed=seed,
                       answer=answer)
    T, L = inp.n_tokens, handle.n_layers
    positions = list(range(T)) if positions is None else list(positions)
    for t in positions:
        if not 0 <= t < T:
            raise MemlensError(f"position {t} is outside the prompt {prompt!r} ({T} tokens)")
    plan = {(kind, layer): restoration(kind, layer, L, window)
            for kind in kinds for layer in range(L)}
    freeze_sites = {s for r in plan.values() for s in r.freeze}
    runs = _base_runs(handle, inp, freeze_sites)
    scores = {kind: np.full((T, L), np.nan) for kind in kinds}
    per_chunk = max(1, batch_size // inp.samples)
    for t in positions:
        if t < inp.span.start:  # the noise cannot reach token t: restoring it changes nothing
            for kind in kinds:
                scores[kind][t, :] = runs.p_corrupted
            continue
        unique = list(dict.fromkeys(plan.values()))
        found: dict[Restoration, float] = {}
        for i in range(0, len(unique), per_chunk):
            chunk = unique[i:i + per_chunk]
            found.update(zip(chunk, _restored_scores(handle, inp, runs, t, chunk), strict=True))
        for (kind, layer), rest in plan.items():
            scores[kind][t, layer] = found[rest]
    ids = inp.input_ids[0].tolist()
    return TraceResult(
        prompt=prompt, subject=subject,
        tokens=[handle.tokenizer.decode([i]) for i in ids], input_ids=ids,
        subject_range=(inp.span.start, inp.span.end),
        answer=handle.tokenizer.decode([inp.answer_id]), answer_id=inp.answer_id,
        p_clean=inp.p_clean, p_corrupted=runs.p_corrupted, noise=inp.noise_spec.scale,
        noise_dist=inp.noise_spec.dist, samples=inp.samples, seed=seed, window=window,
        scores=scores,
    )


def severed_trace(handle: ModelHandle, prompt: str, subject: str, **kwargs: Any) -> TraceResult:
    """Hidden-state trace plus the two severed traces (MLP / attention at the token frozen).

    Accepts :func:`trace_fact`'s keywords except ``kinds``.

        result = severed_trace(handle, "Toulouse is a city in", "Toulouse")
        gap = result.scores["hidden"] - result.scores["severed_mlp"]   # what the MLPs carry
    """
    if "kinds" in kwargs:
        raise MemlensError("severed_trace chooses its kinds itself (hidden, severed_mlp, "
                           "severed_attn); use trace_fact for other kinds")
    return trace_fact(handle, prompt, subject, kinds=("hidden",) + SEVERED_KINDS, **kwargs)


MIN_RELATIVE_EFFECT = 0.02  # best_layer: an indirect effect below 2% of p_clean is no effect


class NoCausalEffect(MemlensError):
    """A causal trace found no layer whose restoration brings the answer back."""


def best_layer(handle: ModelHandle, prompt: str, subject: str, kind: str = "mlp",
               **kwargs: Any) -> int:
    """The layer where restoring ``kind`` at the subject's LAST token has the largest
    indirect effect — the layer ROME edits when none is given. The MLP/attention window is
    :func:`depth_scaled_window` unless ``window`` is given.

    Only layers from which that token can still reach the prediction compete: when the
    subject ends before the prompt's last token, the last layer is left out (no later
    attention carries its output to the last position). Raises :class:`NoCausalEffect` when
    no competing layer's indirect effect (restored P(answer) − corrupted P(answer)) exceeds
    ``MIN_RELATIVE_EFFECT`` × p_clean — a subject the model does not know, or a random model.

        layer = best_layer(handle, "Toulouse is a city in", "Toulouse")
    """
    last = subject_span(handle.tokenizer, prompt, subject).last
    kwargs.setdefault("window", depth_scaled_window(handle.n_layers))
    result = trace_fact(handle, prompt, subject, kinds=(kind,), positions=[last], **kwargs)
    reachable = handle.n_layers - (1 if last < len(result.input_ids) - 1 else 0)
    effects = result.scores[kind][last][:reachable] - result.p_corrupted
    best = float(np.nanmax(effects)) if np.isfinite(effects).any() else float("nan")
    if not best > MIN_RELATIVE_EFFECT * result.p_clean:
        raise NoCausalEffect(
            f"the causal trace of {prompt!r} found no layer where restoring the {kind} at "
            f"{subject!r} brings back {result.answer!r}: best indirect effect {best:.2g} "
            f"(p_clean {result.p_clean:.3g}, p_corrupted {result.p_corrupted:.3g}; the model "
            "does not seem to know this subject)")
    return int(np.nanargmax(effects))
