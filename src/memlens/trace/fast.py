"""The fast causal trace: every restoration of one token in a few batched forward passes.

The naive algorithm (:mod:`memlens.trace.reference`) runs the whole model once per
(token, layer, kind). Here the clean and corrupted runs are computed once, and for each token t
all restorations of every kind run in one batched forward pass (chunked by ``batch_size``
rows), which only computes positions ≥ t: positions < t are unchanged by a restoration at t, so
their keys/values come from the corrupted run's KV cache (Hugging Face's own incremental
decoding, so every architecture works). That cache is kept once per noise sample: each layer
hands its attention the rows it needs, followed by the new keys/values, and stores nothing, so
no layer's keys/values outlive its attention. Restoring at layer l cannot change blocks below l:
each block runs only on the rows whose restoration can change it (the block's ``forward`` is
wrapped for the pass; its KV-cache layer and batch-shaped arguments are narrowed to those
rows), the other rows take the corrupted run's block output. Restorations before the subject
are no-ops (the noise cannot reach them): their score is p_corrupted without a forward pass.
Identical restorations (e.g. the clipped MLP windows of a shallow model) are computed once.
Only the last position's logits are computed. The result equals the naive loop (tests check
1e-5 on every architecture).

    runs = base_runs(handle, inp, freeze_sites)        # clean and corrupted runs, once
    scores = restored_scores(handle, inp, runs, token, restorations)   # P(answer) per restoration
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memlens import hooks
from memlens.errors import MemlensError
from memlens.model import kv_cache_kwargs, kv_cache_of
from memlens.trace.sites import (
    SITE_HOOKS,
    Restoration,
    Site,
    TraceInputs,
    add_noise_hook,
    site_hook,
)

if TYPE_CHECKING:
    from memlens.model import ModelHandle


@dataclass
class BaseRuns:
    """Clean site values (T, d) and corrupted ones (S, T, d), read once per trace."""

    clean: dict[Site, torch.Tensor]
    corrupted: dict[Site, torch.Tensor]  # every block output, and the frozen sites
    p_corrupted: float
    block_tuple_len: int  # blocks return a tuple of this length (0: a bare tensor)


def base_runs(handle: ModelHandle, inp: TraceInputs, freeze_sites: set[Site]) -> BaseRuns:
    model, n_layers = handle.model, handle.n_layers
    sites = [(c, layer) for c in SITE_HOOKS for layer in range(n_layers)]
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
    return BaseRuns(clean, corrupted, p_corrupted, structure[0])


def _first_changed_block(rest: Restoration) -> int:
    """The lowest block whose output a restoration can change: blocks below it (and, when the
    lowest restored site is a block output, that block too) output the corrupted values."""
    layer = min(layer for _, layer in rest.restore)
    inside = any(c != "hidden" and site_layer == layer for c, site_layer in rest.restore)
    return layer if inside else layer + 1


@contextmanager
def _skip_unchanged_blocks(handle: ModelHandle, runs: BaseRuns, token: int,
                           sample_of_row: torch.Tensor, computed: list[torch.Tensor], past):
    """Run block j only on the rows ``computed[j]`` (those whose restoration can change it);
    the other rows get the corrupted run's block output, which is what they would compute.

    Each block's KV-cache layer gives the prefix of its computed rows' noise samples
    (:func:`_prefix_read_only`); tensors of the block's arguments with the batch as first
    dimension (e.g. 4-D masks) are narrowed alike.
    """
    blocks = handle.arch.blocks(handle.model)
    batch = int(sample_of_row.shape[0])
    replacements = []
    for j, block in enumerate(blocks):
        rows = computed[j].to(handle.device)
        if len(rows) == batch:
            continue
        corrupted = runs.corrupted[("hidden", j)][sample_of_row, token:]
        replacements.append((block, _row_subset_forward(block.forward, rows, corrupted,
                                                        runs.block_tuple_len)))
    prefix_rows = [sample_of_row[rows] for rows in computed]
    with hooks.forwards_replaced(replacements), _prefix_read_only(past, prefix_rows):
        yield


@contextmanager
def _prefix_read_only(past, prefix_rows: list[torch.Tensor]):
    """While active, cache layer j answers ``update(k, v)`` with its stored rows
    ``prefix_rows[j]`` followed by k, v — what its own ``update`` returns after a
    ``reorder_cache`` to those rows — and keeps nothing: the stored prefix stays one row per
    noise sample instead of one per batch row, and each layer's keys/values are freed with its
    attention (float32 GPT-2 XL, 144 restorations of a 7-token fact: ~0.5 GiB of cache
    otherwise)."""
    if past is None:
        yield
        return
    layers = list(past.layers)
    for layer, rows in zip(layers, prefix_rows, strict=True):
        def update(key_states, value_states, *args, layer=layer, rows=rows, **kwargs):
            view = copy.copy(layer)  # the layer's own update, on its chosen rows, discarded
            view.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            view.values = layer.values.index_select(0, rows.to(layer.values.device))
            return type(layer).update(view, key_states, value_states, *args, **kwargs)

        layer.update = update
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("update", None)


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


def restored_scores(handle: ModelHandle, inp: TraceInputs, runs: BaseRuns, token: int,
                     restorations: Sequence[Restoration]) -> list[float]:
    """P(answer) of each restoration at ``token``, in one forward pass over positions ≥ token.

    Rows are laid out restoration-major: row r·S + s is restoration r with noise sample s.
    """
    model, S = handle.model, inp.samples
    R = len(restorations)
    sample_of_row = torch.arange(R * S, device=handle.device) % S
    suffix = inp.input_ids[:, token:].expand(R * S, -1)
    past = _corrupted_prefix_cache(handle, inp, token)
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


def _corrupted_prefix_cache(handle: ModelHandle, inp: TraceInputs, token: int):
    """KV cache of the corrupted run over positions < ``token``, one row per noise sample."""
    if token == 0:
        return None
    prefix = inp.input_ids[:, :token].expand(inp.samples, -1)
    corrupt = add_noise_hook(inp.noise, inp.span, 0, token)
    with torch.no_grad(), hooks.hooked(handle.model, {"hook_embed": corrupt} if corrupt else {}):
        past = kv_cache_of(handle.model(input_ids=prefix, use_cache=True, logits_to_keep=1))
    layers = getattr(past, "layers", None)
    if not layers or not all(hasattr(layer, "keys") for layer in layers):
        raise MemlensError(f"{handle.arch.model_type} returned no KV cache of per-layer keys "
                           "and values; causal tracing needs one (use_cache=True)")
    return past
