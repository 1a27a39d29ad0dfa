"""Key statistics: C = E[k kᵀ] over non-pad tokens, one pass for many layers, cache, resume."""

from __future__ import annotations

import json

import pytest
import torch

from memlens import hooks
from memlens.errors import EmptyInput, MemlensError, NumericalError
from memlens.stats import KeyStats, layer_stats, parse_layers, token_batches
from memlens.testing import TEXT, random_text

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")


def random_corpus(path, n=120, seed=0):
    """Sentences of random words (varied enough for C to have full rank at d_ff = 128)."""
    path.write_text(random_text(n, (3, 30), seed=seed))
    return path


def test_one_pass_equals_per_layer_passes(gpt2, tmp_path):
    corpus = random_corpus(tmp_path / "c.txt")
    together = layer_stats(gpt2, [0, 2, 3], corpus=corpus, batch_tokens=128, progress=False,
                           cache=False)
    for layer in (0, 2, 3):
        alone = layer_stats(gpt2, [layer], corpus=corpus, batch_tokens=128, progress=False,
                            cache=False)[layer]
        assert torch.equal(together[layer].mom2, alone.mom2)
        assert together[layer].count == alone.count


def test_second_moment_matches_direct_computation_over_non_pad_tokens(gpt2, tmp_path):
    corpus = random_corpus(tmp_path / "c.txt", n=20)
    stats = layer_stats(gpt2, [1], corpus=corpus, batch_tokens=96, progress=False, cache=False)[1]
    keys = []
    for line in corpus.read_text().splitlines():
        ids = torch.tensor([gpt2.tokenizer(line)["input_ids"]])
        with torch.no_grad(), hooks.capture(gpt2.model, ["blocks.1.mlp.hook_post"]) as cache:
            gpt2.model(ids)
        keys.append(cache["blocks.1.mlp.hook_post"][0].double())
    k = torch.cat(keys)
    assert stats.count == k.shape[0]
    torch.testing.assert_close(stats.mom2, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-9)
    assert stats.mom2.dtype == torch.float64
    assert stats.mom2.shape == (gpt2.d_ff, gpt2.d_ff)


def test_batches_respect_the_token_budget_and_truncate(gpt2):
    texts = [" ".join(["Paris"] * n) for n in (2, 50, 3, 7, 200)]
    batches = token_batches(gpt2.tokenizer, texts, max_len=16, batch_tokens=40)
    assert sum(len(b) for b in batches) == 5
    for batch in batches:
        assert all(len(row) <= 16 for row in batch)
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 40


def test_cached_layers_are_loaded_not_recomputed(gpt2, tmp_path, monkeypatch):
    corpus = random_corpus(tmp_path / "c.txt", n=30)
    first = layer_stats(gpt2, [1, 2], corpus=corpus, progress=False)
    import memlens.stats as stats_module

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached layer")

    monkeypatch.setattr(stats_module, "_collect", fail)
    again = layer_stats(gpt2, [2, 1], corpus=corpus, progress=False)
    assert torch.equal(again[1].mom2, first[1].mom2) and again[2].count == first[2].count
    assert again[1].fingerprint == gpt2.fingerprint()


def test_interrupted_run_resumes_from_its_checkpoint(gpt2, tmp_path):
    corpus = random_corpus(tmp_path / "c.txt", n=60)
    expected = layer_stats(gpt2, [1, 3], corpus=corpus, batch_tokens=64, progress=False,
                           cache=False)
    calls = {"n": 0}

    def interrupt(tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), hooks.hooked(gpt2.model, {"blocks.0.hook_mlp_out":
                                                                      interrupt}):
        layer_stats(gpt2, [1, 3], corpus=corpus, batch_tokens=64, progress=False,
                    checkpoint_every=2)
    calls["n"] = 0
    with hooks.hooked(gpt2.model, {"blocks.0.hook_mlp_out": interrupt}):
        calls["n"] = -10_000  # never interrupt again; count forward passes
        resumed = layer_stats(gpt2, [1, 3], corpus=corpus, batch_tokens=64, progress=False,
                              checkpoint_every=2)
    n_batches = len(token_batches(gpt2.tokenizer, corpus.read_text().splitlines(), 256, 64))
    assert calls["n"] + 10_000 == n_batches - 4  # 4 batches were checkpointed before the stop
    for layer in (1, 3):
        torch.testing.assert_close(resumed[layer].mom2, expected[layer].mom2, rtol=1e-12,
                                   atol=1e-15)
        assert resumed[layer].count == expected[layer].count


def test_jsonl_corpus_and_bad_corpora(gpt2, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXT.split(". ")))
    stats = layer_stats(gpt2, [0], corpus=path, progress=False, cache=False)
    assert stats[0].count > 0
    with pytest.raises(MemlensError, match="has no corpus.txt"):
        layer_stats(gpt2, [0], progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(EmptyInput):
        layer_stats(gpt2, [0], corpus=empty, progress=False)
    with pytest.raises(MemlensError):
        layer_stats(gpt2, [0], corpus="no-such-dataset-anywhere", progress=False)
    with pytest.raises(IndexError, match="out of range"):
        layer_stats(gpt2, [9], corpus=path, progress=False)


def test_nan_statistics_raise_numerical_error():
    stats = KeyStats(layer=0, mom2=torch.full((4, 4), float("nan"), dtype=torch.float64),
                     count=10)
    with pytest.raises(NumericalError, match="NaN"):
        stats.check_finite()
    big = torch.eye(600, dtype=torch.float64)  # checked in blocks of rows: the last block too
    KeyStats(layer=0, mom2=big, count=10).check_finite()
    for value in (float("inf"), float("-inf"), float("nan")):
        bad = big.clone()
        bad[599, 3] = value
        with pytest.raises(NumericalError):
            KeyStats(layer=0, mom2=bad, count=10).check_finite()


def test_statistics_pass_keeps_no_kv_cache(gpt2, tmp_path):
    """The corpus forward passes ask for no KV cache: on GPT-2 XL the cache of the layers below
    the deepest hooked one held ~0.3 GiB during each statistics batch."""
    asked = []
    forward = gpt2.model.forward

    def spy(*args, **kwargs):
        asked.append(kwargs.get("use_cache"))
        return forward(*args, **kwargs)

    path = tmp_path / "c.txt"
    path.write_text(random_text(6, (5, 12), seed=0))
    gpt2.model.forward = spy
    try:
        layer_stats(gpt2, [0], corpus=path, n_samples=6, progress=False, cache=False)
    finally:
        del gpt2.model.forward
    assert asked and all(flag is False for flag in asked)


def test_parse_layers():
    assert parse_layers("3-5") == [3, 4, 5]
    assert parse_layers("2,7,1") == [1, 2, 7]
    assert parse_layers("1-2,6") == [1, 2, 6]
    with pytest.raises(MemlensError):
        parse_layers("a-b")


def test_passes_bounded_by_memory_equal_one_pass_and_stay_on_disk(gpt2, tmp_path,
                                                                   monkeypatch):
    import memlens.stats as stats_module
    from memlens.gram import packed_numel
    from memlens.stats import StatsFiles

    corpus = random_corpus(tmp_path / "c.txt", n=40)
    one_pass = layer_stats(gpt2, [0, 1, 2], corpus=corpus, progress=False, cache=False)
    passes: list[list[int]] = []
    collect = stats_module._collect

    def counting(handle, layers, *args):
        passes.append(list(layers))
        return collect(handle, layers, *args)

    monkeypatch.setattr(stats_module, "_collect", counting)
    budget = 2 * packed_numel(gpt2.d_ff) * 8  # two layers' packed float64 sums per pass
    bounded = layer_stats(gpt2, [0, 1, 2], corpus=corpus, progress=False, max_pass_bytes=budget)
    assert passes == [[0, 1], [2]]
    assert isinstance(bounded, StatsFiles) and list(bounded) == [0, 1, 2]
    for layer in (0, 1, 2):
        read = bounded[layer]
        assert read.disposable and not one_pass[layer].disposable
        assert torch.equal(read.mom2, one_pass[layer].mom2)
        assert read.count == one_pass[layer].count
        assert read.mom2 is not bounded[layer].mom2  # a fresh copy on every lookup
    with pytest.raises(KeyError):
        bounded[3]
    passes.clear()
    assert isinstance(layer_stats(gpt2, [0, 1, 2], corpus=corpus, progress=False,
                                  max_pass_bytes=budget), StatsFiles)
    assert passes == []  # read from the cache
    held = layer_stats(gpt2, [1, 2], corpus=corpus, progress=False, max_pass_bytes=budget)
    assert isinstance(held, dict) and torch.equal(held[2].mom2, one_pass[2].mom2)


def test_stats_meta_reads_no_matrix_from_files(gpt2, tmp_path, monkeypatch):
    from collections import ChainMap

    from memlens.stats import StatsFiles, stats_meta

    corpus = random_corpus(tmp_path / "c.txt", n=40)
    held = layer_stats(gpt2, [0, 1, 2], corpus=corpus, progress=False)
    files = layer_stats(gpt2, [1, 2], corpus=corpus, progress=False, max_pass_bytes=1)
    assert isinstance(files, StatsFiles)
    monkeypatch.setattr(StatsFiles, "__getitem__", lambda self, layer: pytest.fail("read C"))
    described = stats_meta(ChainMap({0: held[0]}, files))
    assert list(described) == ["0", "1", "2"]
    for layer in (0, 1, 2):
        expected = held[layer].meta()
        got = described[str(layer)]
        assert got.pop("trace") == pytest.approx(expected.pop("trace"), rel=1e-12)
        assert got == expected
