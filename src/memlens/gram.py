"""Σ k kᵀ of many keys, summed in float64 and kept as the upper block triangle of the
symmetric result: half the memory and half the products of a full d × d sum.

    gram = GramSum(d_ff)                    # zeros: d(d+b)/2 float64 values, not d²
    gram.add(keys)                          # keys (n, d_ff) float32: Σ k kᵀ += keysᵀ keys
    C = gram.full().div_(n_tokens)          # (d_ff, d_ff) float64, exactly symmetric

Row block i (rows [ib, ib+b)) keeps only columns [ib, d): its part of the upper triangle and
the diagonal block. All blocks are views of one flat buffer, ``gram.flat``, which is what
checkpoints, all-reduces and cache files hold. Each batch's block product
``keys[:, ib:ib+b]ᵀ keys[:, ib:]`` is formed in float32 (at most b × d values: no d × d
float32 product, nor a float64 copy of one) and added to the float64 block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

BLOCK = 256  # rows per block


def _spans(d: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """(first row, last row + 1, offset in the flat buffer, number of values) of each row
    block."""
    offset = 0
    for start in range(0, d, block):
        stop = min(start + block, d)
        size = (stop - start) * (d - start)
        yield start, stop, offset, size
        offset += size


def packed_numel(d: int, block: int = BLOCK) -> int:
    """Values of the upper block triangle of a d × d matrix with ``block`` rows per block."""
    return sum(size for *_, size in _spans(d, block))


class GramSum:
    """A running Σ k kᵀ over keys of dimension ``d`` (see the module docstring)."""

    def __init__(self, d: int, *, block: int = BLOCK, device: torch.device | str | None = None,
                 flat: torch.Tensor | None = None):
        if flat is None:
            flat = torch.zeros(packed_numel(d, block), dtype=torch.float64, device=device)
        elif flat.shape != (packed_numel(d, block),) or flat.dtype != torch.float64:
            raise ValueError(f"a packed {d} × {d} sum with blocks of {block} rows is "
                             f"{packed_numel(d, block)} float64 values, got {tuple(flat.shape)} "
                             f"{flat.dtype}")
        self.d, self.block, self.flat = d, block, flat
        self.blocks = [flat[offset:offset + size].view(stop - start, d - start)
                       for start, stop, offset, size in _spans(d, block)]

    def add(self, keys: torch.Tensor) -> None:
        """Σ k kᵀ += ``keys``ᵀ ``keys`` for ``keys`` (n, d): float32 block products, float64 sum."""
        keys = keys.float()
        for (start, stop, *_), rows in zip(_spans(self.d, self.block), self.blocks, strict=True):
            rows += keys[:, start:stop].T @ keys[:, start:]

    def trace(self) -> float:
        """Σ of the diagonal (from the diagonal blocks)."""
        return float(sum(rows[:, :rows.shape[0]].diagonal().sum() for rows in self.blocks))

    def is_finite(self, chunk: int = 1 << 20) -> bool:
        """No NaN/inf, checked ``chunk`` values at a time (no full-size mask)."""
        return all(bool(torch.isfinite(part).all()) for part in self.flat.split(chunk))

    def full(self) -> torch.Tensor:
        """The symmetric (d, d) float64 matrix."""
        return symmetric_from_blocks(self.d, self.block,
                                     lambda offset, size: self.flat[offset:offset + size],
                                     device=self.flat.device)


def symmetric_from_blocks(d: int, block: int, read: Callable[[int, int], torch.Tensor], *,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """The (d, d) float64 matrix whose upper block triangle is packed as in a GramSum's flat
    buffer, ``read(offset, size)`` returning those values of it (one row block at a time: a
    cache file is read block by block into the result). The lower triangle is the transpose of
    the upper, the diagonal blocks included, so the result is symmetric bit for bit."""
    out = torch.empty(d, d, dtype=torch.float64, device=device)
    for index, (start, stop, offset, size) in enumerate(_spans(d, block)):
        values = read(offset, size)
        if values.numel() != size:
            raise ValueError(f"row block {index} of a packed {d} × {d} matrix holds {size} "
                             f"values, got {values.numel()}")
        rows = values.to(device=out.device, dtype=torch.float64).view(stop - start, d - start)
        out[start:stop, start:] = rows
        out[start:, start:stop] = rows.T
        diagonal = rows[:, :stop - start]
        out[start:stop, start:stop] = diagonal.triu() + diagonal.triu(1).T
    return out
