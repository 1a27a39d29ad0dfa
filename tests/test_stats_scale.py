"""Key statistics at scale (issue 21): parquet corpora, data-parallel sums under torchrun (gloo on
CPU) equal to one process, and the reference code's npz layout in and out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from memlens.errors import MemlensError
from memlens.model import load_model
from memlens.stats import layer_stats
from memlens.stats_io import export_reference_stats, import_reference_stats, reference_stats_name

pytestmark = pytest.mark.usefixtures("isolated_home", "one_thread")

KW = dict(n_samples=40, max_len=64, batch_tokens=256, progress=False, cache=False)


def test_parquet_corpus_equals_text_corpus(gpt2, corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [t for t in corpus.read_text().splitlines() if t.strip()]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": lines, "id": list(range(len(lines)))}), path,
                   row_group_size=16)
    a = layer_stats(gpt2, [1], corpus=corpus, **KW)[1]
    b = layer_stats(gpt2, [1], corpus=path, **KW)[1]
    assert a.count == b.count and torch.equal(a.mom2, b.mom2)
    pq.write_table(pa.table({"body": lines}), tmp_path / "bad.parquet")
    with pytest.raises(MemlensError, match="no 'text' column"):
        layer_stats(gpt2, [1], corpus=tmp_path / "bad.parquet", **KW)


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from memlens.model import load_model
    from memlens.stats import layer_stats
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    handle = load_model(sys.argv[1], device="cpu")
    stats = layer_stats(handle, [1, 2], corpus=sys.argv[2], n_samples=40, max_len=64,
                        batch_tokens=256, progress=False, cache=False)
    if dist.get_rank() == 0:
        torch.save({l: (s.mom2, s.count) for l, s in stats.items()}, sys.argv[3])
    dist.destroy_process_group()
""")


def test_torchrun_two_ranks_equal_one_process(random_model_dirs, corpus, tmp_path):
    ref = str(random_model_dirs["gpt2"])
    script, out = tmp_path / "worker.py", tmp_path / "two.pt"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MEMLENS_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", str(script), ref, str(corpus), str(out)],
                   check=True, env=env, timeout=600)
    two = torch.load(out, weights_only=True)
    one = layer_stats(load_model(ref, device="cpu"), [1, 2], corpus=corpus, **KW)
    for layer in (1, 2):
        mom2, count = two[layer]
        assert count == one[layer].count
        # the same float32 per-batch products, float64 sums added in another order
        assert torch.allclose(mom2, one[layer].mom2, rtol=1e-12, atol=1e-15)


def test_reference_npz_round_trip(gpt2, corpus, tmp_path):
    stats = layer_stats(gpt2, [2], corpus=corpus, **KW)[2]
    name = reference_stats_name(gpt2, 2, n=40)
    assert name == "transformer.h.2.mlp.c_proj_float32_mom2_40.npz"
    path = export_reference_stats(stats, tmp_path / "wikipedia_stats" / name,
                                  precision="float64")
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
        assert int(data["mom2.count"]) == stats.count  # the file holds the SUM Σ k kᵀ
        assert np.allclose(data["mom2.mom2"] / stats.count, stats.mom2.numpy())
    back = import_reference_stats(path, 2, handle=gpt2)
    assert back.count == stats.count and back.n_samples == 40
    assert torch.allclose(back.mom2, stats.mom2, rtol=1e-12)


def test_reference_npz_written_as_the_reference_does(gpt2, tmp_path):
    """A file laid out as the reference code writes it (float32 sums, 'sample_size')."""
    keys = torch.randn(500, gpt2.d_ff)
    path = tmp_path / "stats.npz"
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(500), "mom2.mom2": (keys.T @ keys).numpy(),
                      "sample_size": np.array(100000)})
    stats = import_reference_stats(path, 3, handle=gpt2)
    assert stats.mom2.dtype is torch.float64 and stats.count == 500
    assert torch.allclose(stats.mom2, (keys.T @ keys).double() / 500, rtol=1e-5)
    np.savez(tmp_path / "wrong.npz", **{"mom2.count": np.array(5),
                                        "mom2.mom2": np.eye(gpt2.d_ff + 1)})
    with pytest.raises(MemlensError, match="d_ff"):
        import_reference_stats(tmp_path / "wrong.npz", 3, handle=gpt2)


def test_stats_command_with_pass_gib_equals_the_api(random_model_dirs, corpus):
    import json

    from typer.testing import CliRunner

    from memlens.cli import app

    ref = str(random_model_dirs["gpt2"])
    result = CliRunner().invoke(app, ["stats", "-m", ref, "--layers", "0-2", "--corpus",
                                      str(corpus), "--samples", "40", "--max-len", "64", "--batch-tokens", "256",
                                      "--pass-gib", "0.001", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    one = layer_stats(load_model(ref, device="cpu"), [0, 1, 2], corpus=corpus, **KW)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["count"] == one[row["layer"]].count
        assert row["trace"] == pytest.approx(float(one[row["layer"]].mom2.trace()), rel=1e-12)
