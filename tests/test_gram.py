"""GramSum: Σ k kᵀ kept as its upper block triangle, and the packed cache files of C."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from memlens.gram import GramSum, packed_numel, symmetric_from_blocks


def keys(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d, block", [(10, 4), (8, 4), (3, 4), (300, 256)])
def test_packed_sum_equals_the_full_gram_and_is_exactly_symmetric(d, block):
    gram = GramSum(d, block=block)
    assert gram.flat.numel() == packed_numel(d, block) \
        == sum(rows.numel() for rows in gram.blocks)
    batches = [keys(7, d, seed) for seed in range(3)]
    for batch in batches:
        gram.add(batch)
    everything = torch.cat(batches).double()
    expected = everything.T @ everything
    full = gram.full()
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(full, full.T)
    assert gram.trace() == pytest.approx(float(expected.trace()), rel=1e-6)


def test_packing_halves_the_memory_of_a_large_sum():
    assert packed_numel(6400) * 2 < 1.05 * 6400 ** 2  # GPT-2 XL: 170 MB instead of 328 MB
    assert packed_numel(128) == 128 ** 2  # one block: nothing to save


def test_non_finite_values_are_found_in_every_block():
    gram = GramSum(10, block=4)
    assert gram.is_finite(chunk=5)
    for value in (float("nan"), float("inf"), float("-inf")):
        gram.flat.zero_()
        gram.blocks[-1][-1, -1] = value  # the last value of the last chunk
        assert not gram.is_finite(chunk=5)


def test_a_flat_buffer_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="float64 values"):
        GramSum(10, block=4, flat=torch.zeros(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="row block 0"):
        symmetric_from_blocks(10, 4, lambda offset, size: torch.zeros(9))


def test_cache_files_are_packed_and_old_full_files_still_load(tmp_path):
    from memlens.stats import _load, _save

    gram = GramSum(10, block=4)
    gram.add(keys(20, 10))
    gram.flat.div_(20)
    meta = {"layer": 2, "count": 20, "corpus": "c", "n_samples": 5, "fingerprint": "f",
            "d_ff": 10, "trace": gram.trace()}
    _save(tmp_path, gram, meta)
    loaded = _load(tmp_path, 2)
    assert torch.equal(loaded.mom2, gram.full())
    assert (loaded.count, loaded.corpus, loaded.n_samples) == (20, "c", 5)

    old = tmp_path / "old"  # the layout before packing: the whole matrix as "mom2"
    old.mkdir()
    save_file({"mom2": gram.full()}, str(old / "layer2.safetensors"),
              metadata={k: str(v) for k, v in meta.items()})
    assert torch.equal(_load(old, 2).mom2, gram.full())
