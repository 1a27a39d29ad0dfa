"""The forward passes of the δ optimisation (:mod:`memlens.edit.optimize`): δ is added at one
point, at each row's fact token, and the final hidden states are read.

    passes = SuffixPasses(handle, "blocks.3.hook_resid_post", rows, lookups)
    hidden = passes.run(row_indices, add_delta)     # (rows, columns, d_model), before unembedding
    passes.column(rows, positions)                  # where token ``positions`` sit in ``hidden``

:class:`SuffixPasses` (the default) runs only what δ can change — the blocks from the point up,
the positions from the fact token on — after one pass that caches the rest;
:class:`FullPasses` runs the whole model every step, as the reference code does. Both give the
same losses up to float rounding (tests/test_memit.py). :class:`SuffixPasses` also runs faster
kernels of the same functions (:func:`fast_kernels`): the fused tanh-GELU and, on CPU, eager
attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from memlens import hooks
from memlens.arch import parse_hook_name
from memlens.model import kv_cache_kwargs, kv_cache_of
from memlens.tokens import pad_id, pad_rows


class FullPasses:
    """Each step runs the whole model on the whole right-padded rows (the reference's way)."""

    def __init__(self, handle: Any, point: str, rows: list[list[int]], lookups: list[int]):
        self.handle, self.point = handle, point
        self.input_ids, self.attention = pad_rows(rows, pad_id(handle.tokenizer))
        self.lookups = torch.tensor(lookups)

    def column(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Column of the pass's output holding token ``positions`` of ``rows``."""
        return positions

    def fact_column(self, rows: torch.Tensor) -> torch.Tensor:
        return self.lookups[rows]

    def run(self, rows: torch.Tensor, add_delta, read: Any = None) -> torch.Tensor:
        """Final hidden states (before the unembedding) of ``rows`` with δ added at the point
        (``read`` is :class:`SuffixPasses`'; this reference runs everything)."""
        device = self.handle.device
        with hooks.edit(self.handle.model, self.point, add_delta):
            return self.handle.model.base_model(
                input_ids=self.input_ids[rows].to(device),
                attention_mask=self.attention[rows].to(device)).last_hidden_state


class SuffixPasses:
    """Each step runs only what δ can change: the blocks from the point's block up, on the
    positions from the fact token on.

    Rows are left-padded so that every fact token sits in column P. One pass without gradients
    stores the KV cache of columns < P and the output, on columns ≥ P, of the last block below
    the point (δ reaches neither). Each step is then a cached forward over the S ≥ 1 suffix
    columns in which the blocks below the point return that stored output without running.
    Real tokens keep their positions, so the losses equal :class:`FullPasses`' up to float
    rounding.
    """

    def __init__(self, handle: Any, point: str, rows: list[list[int]], lookups: list[int]):
        self.handle, self.point = handle, point
        model, device = handle.model, handle.device
        self.lookups = torch.tensor(lookups)
        width = max(len(r) - p for r, p in zip(rows, lookups, strict=True))
        self.n_prefix = P = int(self.lookups.max())
        ids, mask = pad_rows(rows, pad_id(handle.tokenizer), starts=[P - p for p in lookups],
                             width=P + width)  # every fact token in column P
        self.attention = mask.to(device)
        self.positions = (mask.cumsum(1) - 1).clamp(min=0).to(device)
        self.suffix = ids[:, P:].to(device)
        self.skipped = _blocks_below(point)
        self.gelus = _tanh_gelus(model)
        points = [f"blocks.{self.skipped - 1}.hook_resid_post"] if self.skipped else []
        structure: list[int] = []
        probe = handle.arch.blocks(model)[0].register_forward_hook(
            lambda module, args, out: structure.append(len(out) if isinstance(out, tuple) else 0))
        try:
            with torch.no_grad(), hooks.capture(model, points) as cache, \
                    fast_kernels(model, self.gelus):
                out = model(input_ids=ids.to(device), attention_mask=self.attention,
                            position_ids=self.positions, use_cache=True, logits_to_keep=1)
        finally:
            probe.remove()
        self.tuple_len = structure[0]
        self.entry = cache[points[0]][:, P:] if points else None
        keep = self.attention[:, None, :P, None].bool()  # padded keys/values → 0, not NaN
        layers = kv_cache_of(out).layers
        self.prefix_kv = [(torch.where(keep, layer.keys[:, :, :P], 0.0),
                           torch.where(keep, layer.values[:, :, :P], 0.0))
                          for layer in layers[self.skipped:]] if P else None
        # skipped blocks never read their cache layer: a zero-stride stand-in of the prefix's
        # shape keeps the cache's length (read from layer 0) without copying anything, also
        # when every block is skipped (the point is the last block's output)
        self.stand_in = tuple(t.new_zeros(()).expand(1, t.shape[1], P, *t.shape[3:])
                              for t in (layers[0].keys, layers[0].values))
        self._prefix: list[tuple[torch.Tensor, torch.Tensor]] = []  # each cache layer as built
        self._gathered: tuple[torch.Tensor, Any, torch.Tensor | None] | None = None

    def column(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions - self.lookups[rows]

    def fact_column(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rows)

    def run(self, rows: torch.Tensor, add_delta,
            read: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states of ``rows`` (indices into the output: ``column``) with δ added
        at the point. ``read`` = (row, column) of the output: only these are read, so the last
        block's MLP runs on them alone (elsewhere the output lacks it)."""
        with hooks.edit(self.handle.model, self.point, add_delta), self._skip_lower(rows), \
                fast_kernels(self.handle.model, self.gelus), self._top_mlp_only(read):
            return self._forward(rows)

    @contextmanager
    def _top_mlp_only(self, read: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
        """The last block's MLP (position by position) on the ``read`` entries only: nothing
        but the final norm and the unembedding at read columns comes after it. Not when δ is
        added in the last block (its MLP output may be the point)."""
        top = len(self.handle.arch.blocks(self.handle.model)) - 1
        if read is None or self.skipped >= top:
            yield
            return
        mlp = self.handle.model.get_submodule(self.handle.arch.module_name(top, "mlp"))
        original = mlp.forward
        row, column = (t.to(self.handle.device) for t in read)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = original(x[row, column][None], *args, **kwargs)
            if not isinstance(out, torch.Tensor):  # an MLP returning more (e.g. a router loss)
                return original(x, *args, **kwargs)
            return out.new_zeros(*x.shape[:-1], out.shape[-1]).index_put((row, column), out[0])

        with hooks.forwards_replaced([(mlp, forward)]):
            yield

    def _of_rows(self, rows: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """The KV cache holding the prefix of ``rows`` and their stored entry, built again only
        when the rows change (when facts stop). A step's forward appends the suffix to every
        layer; :meth:`_prefix_only` takes it back off before the next step instead of building
        the cache anew, which would copy the prefix."""
        if self._gathered is None or not torch.equal(self._gathered[0], rows):
            if len(rows) == len(self.lookups):  # rows are sorted and distinct: all of them
                kv, entry = self.prefix_kv or [], self.entry
            else:
                on = rows.to(self.handle.device)
                kv = [(k[on], v[on]) for k, v in self.prefix_kv or []]
                entry = None if self.entry is None else self.entry[on.to(self.entry.device)]
            past = None
            if self.prefix_kv is not None:
                from transformers import DynamicCache

                stand_in = tuple(t.expand(len(rows), -1, -1, -1) for t in self.stand_in)
                past = DynamicCache([stand_in] * self.skipped + list(kv),
                                    config=self.handle.model.config)
                self._prefix = [(layer.keys, layer.values) for layer in past.layers]
            self._gathered = (rows.clone(), past, entry)
        return self._gathered[1], self._gathered[2]

    def _prefix_only(self, past: Any) -> bool:
        """Put every layer of ``past`` back to the prefix it was built with (no copy); False
        where a layer is not a plain DynamicLayer (e.g. a sliding window), whose state is more
        than its keys and values: that cache must be built anew."""
        from transformers.cache_utils import DynamicLayer

        if any(type(layer) is not DynamicLayer for layer in past.layers):
            return False
        for layer, (keys, values) in zip(past.layers, self._prefix, strict=True):
            layer.keys, layer.values = keys, values
        return True

    def _forward(self, rows: torch.Tensor) -> torch.Tensor:
        model = self.handle.model
        past = self._of_rows(rows)[0]
        if past is not None and not self._prefix_only(past):
            self._gathered = None
            past = self._of_rows(rows)[0]
        rows = rows.to(self.handle.device)
        return model.base_model(
            input_ids=self.suffix[rows], attention_mask=self.attention[rows],
            position_ids=self.positions[rows, self.n_prefix:], use_cache=past is not None,
            **kv_cache_kwargs(model.base_model, past)).last_hidden_state

    @contextmanager
    def _skip_lower(self, rows: torch.Tensor) -> Iterator[None]:
        """Blocks below the point return the stored entry (of ``rows``) without running; only
        the last one's output is read by the next block."""
        if self.entry is None:
            yield
            return
        blocks = self.handle.arch.blocks(self.handle.model)
        forward = _returning(self._of_rows(rows)[1], self.tuple_len)
        with hooks.forwards_replaced([(blocks[j], forward) for j in range(self.skipped)]):
            yield


@contextmanager
def fast_kernels(model: Any, gelus: list[Any] | None = None) -> Iterator[None]:
    """Faster kernels of the same functions for passes of many short rows: GPT-2's tanh GELU
    (``gelu_new``: eight elementwise ops forward, as many backward) as torch's fused
    ``gelu(approximate="tanh")``, and on CPU eager attention (batched matmuls) instead of SDPA,
    whose CPU kernel costs more than the matmuls for a few query columns. The results differ
    from the model's own kernels by float rounding only. ``gelus``: the model's
    :func:`_tanh_gelus`, for a caller that found them once (not at every step)."""
    fused = [(m, _gelu_tanh) for m in (_tanh_gelus(model) if gelus is None else gelus)]
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    eager = implementation == "sdpa" and next(model.parameters()).device.type == "cpu"
    with hooks.forwards_replaced(fused):
        if not eager:
            yield
            return
        config._attn_implementation = "eager"
        try:
            yield
        finally:
            config._attn_implementation = implementation


def _tanh_gelus(model: Any) -> list[Any]:
    """The model's tanh-approximation GELU modules written as elementwise Python."""
    from transformers import activations

    kinds = tuple(getattr(activations, name) for name in ("NewGELUActivation",
                                                          "FastGELUActivation")
                  if hasattr(activations, name))
    return [m for m in model.modules() if type(m) in kinds]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _returning(stored: torch.Tensor, tuple_len: int):
    """A block forward that computes nothing and returns ``stored`` (as the block would)."""

    def forward(*args, **kwargs):
        out = stored.clone()
        return (out, *(None,) * max(0, tuple_len - 1)) if tuple_len else out

    return forward


def _blocks_below(point: str) -> int:
    """How many blocks δ at ``point`` cannot change: those below its block, and the block too
    when the point is the block's output (``blocks.L.hook_resid_post``)."""
    parsed = parse_hook_name(point)
    if parsed is None:
        return 0
    layer, hook = parsed
    return layer + 1 if hook == "hook_resid_post" else layer
