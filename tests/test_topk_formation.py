"""TopK snapshots over training and the neuron-formation study (memlens.topk.formation)."""

from __future__ import annotations

import json

import pytest
import torch

from memlens.testing import TEXT, random_model
from memlens.topk import alpha_at, topk_modules

K = 8


def test_log_steps_and_keep_steps():
    from memlens.topk.train import TopKTrainConfig, log_steps
    from memlens.topk_mlp import TopKError

    assert log_steps(300) == [10, 20, 50, 100, 200, 300]
    assert log_steps(200) == [10, 20, 50, 100, 200]
    assert log_steps(5) == [5]
    assert TopKTrainConfig(steps=30).snapshot_steps() == [10, 20, 30]
    assert TopKTrainConfig(steps=30, keep_steps=(30, 5, 5)).snapshot_steps() == [5, 30]
    assert TopKTrainConfig(steps=30, keep_steps=()).snapshot_steps() == []
    with pytest.raises(TopKError, match="outside"):
        TopKTrainConfig(steps=30, keep_steps=(40,)).snapshot_steps()


def test_parse_keep_steps():
    from memlens.cli.topk import parse_keep_steps
    from memlens.topk_mlp import TopKError

    assert parse_keep_steps("log") is None and parse_keep_steps("none") == ()
    assert parse_keep_steps("10, 50,100") == (10, 50, 100)
    with pytest.raises(TopKError, match="keep-steps"):
        parse_keep_steps("ten")


def _data():
    from memlens.topk.data import text_blocks

    model, tokenizer = random_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    train, heldout = text_blocks(tokenizer, (TEXT + "\n") * 10, block_size=32)
    return model.config, tokenizer, train, heldout


def _cfg(**kw):
    from memlens.topk.train import TopKTrainConfig

    base = dict(k=K, steps=8, batch_size=8, warmup_steps=2, num_threads=1, progress=False,
                checkpoint_every=0, anneal_ratio=0.5, keep_steps=(2, 4, 6, 8))
    return TopKTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    from memlens.topk.train import train_one

    config, tokenizer, train, heldout = _data()
    out = tmp_path_factory.mktemp("topk-snapshots")
    model, report = train_one("topk", config, tokenizer, train, heldout, _cfg(), out / "topk")
    return out, model, tokenizer, (config, train, heldout)


def test_snapshots_hold_weights_and_alpha_of_their_step(snapshot_run):
    import memlens
    from memlens.topk.train import list_snapshots

    out, model, _, _ = snapshot_run
    snaps = list_snapshots(out)
    assert [s for s, _ in snaps] == [2, 4, 6, 8]
    assert list_snapshots(out / "topk") == snaps == list_snapshots(out / "topk" / "snapshots")
    for step, directory in snaps:
        meta = json.loads((directory / "snapshot.json").read_text())
        # the weights after `step` steps were last updated at α of step − 1
        assert meta["alpha"] == pytest.approx(alpha_at(step - 1, 8, 0.5))
        handle = memlens.load_model(str(directory), device="cpu")
        assert all(m.alpha == pytest.approx(meta["alpha"])
                   for m in topk_modules(handle.model).values())
    final = memlens.load_model(str(snaps[-1][1]), device="cpu").model.state_dict()
    assert all(torch.equal(final[name], value) for name, value in model.state_dict().items())
    first = memlens.load_model(str(snaps[0][1]), device="cpu").model.state_dict()
    assert not all(torch.equal(first[name], value) for name, value in final.items())


def test_resumed_run_rewrites_identical_snapshots_and_reuse_ignores_keep_steps(
        snapshot_run, tmp_path, monkeypatch):
    import memlens
    from memlens.topk.train import AlphaSchedule, list_snapshots, train_one

    out, model, tokenizer, (config, train, heldout) = snapshot_run
    cfg = _cfg(checkpoint_every=3)
    original = AlphaSchedule.on_step

    def crash_at_5(self, step, total):
        if step == 5:
            raise RuntimeError("simulated interruption")
        original(self, step, total)

    monkeypatch.setattr(AlphaSchedule, "on_step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated"):
        train_one("topk", config, tokenizer, train, heldout, cfg, tmp_path / "topk")
    assert (tmp_path / "topk" / "checkpoint.pt").is_file()
    assert [s for s, _ in list_snapshots(tmp_path)] == [2, 4]
    monkeypatch.setattr(AlphaSchedule, "on_step", original)
    resumed, _ = train_one("topk", config, tokenizer, train, heldout, cfg, tmp_path / "topk")
    assert [s for s, _ in list_snapshots(tmp_path)] == [2, 4, 6, 8]
    for (step, a), (_, b) in zip(list_snapshots(tmp_path), list_snapshots(out), strict=True):
        sa = memlens.load_model(str(a), device="cpu").model.state_dict()
        sb = memlens.load_model(str(b), device="cpu").model.state_dict()
        for name in sb:
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step} {name}")
    # a finished run is reused whatever snapshots the new call asks for
    again, _ = train_one("topk", None, tokenizer, None, heldout, _cfg(keep_steps=(3,)),
                         tmp_path / "topk")
    assert [s for s, _ in list_snapshots(tmp_path)] == [2, 4, 6, 8]


def test_settled_index():
    from memlens.topk.formation import settled_index

    assert settled_index(["a", "b", "b"]) == 1
    assert settled_index(["a", "a"]) == 0
    assert settled_index(["a", None]) is None
    assert settled_index(["b", "a", "b"]) == 2


def test_formation_from_reports_criteria():
    from memlens.topk.formation import formation_from_reports
    from memlens.topk.neurons import LayerNeurons, NeuronReport

    def report(ids):  # one layer, units given by their top-token id lists
        layer = LayerNeurons(layer=0, is_topk=True,
                             token_entropy=[1.0 if i else None for i in ids],
                             semantic_entropy=[0.5 if i else None for i in ids],
                             top_tokens=[[str(t) for t in i] for i in ids], top_token_ids=ids,
                             peak=[1.0] * len(ids), self_logit_z=[None] * len(ids),
                             delta_scale=[1.0] * len(ids), dead_fraction=0.0)
        return NeuronReport(model="m", n_tokens=1, embedder="e", settings={}, layers=[layer])

    # unit 0 settles at step 10 on token 7; unit 1 changes at the end; unit 2 dies
    history = [[[1], [2], [3]], [[7, 1], [2], [3]], [[7], [5], [3]], [[7, 2], [6], []]]
    form = formation_from_reports([report(h) for h in history], [5, 10, 20, 40],
                                  [0.5, 0.0, 0.0, 0.0])
    entry = form.layer(0)
    assert entry.settled_step == [10, 40, None]
    assert entry.stable_last_half == [True, False, False]  # last half: steps 20, 40
    assert entry.stable_fraction == pytest.approx(1 / 3)
    assert entry.stable_fraction_alive == pytest.approx(1 / 2)
    assert entry.concept[0] == ["1", "7", "7", "7"]
    assert [s.changed_fraction for s in form.snapshots] == [None, 1 / 3, 1 / 3, 2 / 3]
    assert entry.top_overlap[0] == pytest.approx((0 + 1 / 3 + 1 / 2 + 1) / 4)  # final {7, 2}
    assert "| 5 | 0.50 |" in form.to_markdown()
    json.dumps(form.to_dict())


def test_run_formation_writes_table_and_figures(snapshot_run, tmp_path):
    from memlens.topk.formation import run_formation

    out, _, _, _ = snapshot_run
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    report = run_formation(out, str(corpus), tmp_path / "f", max_blocks=16)
    assert report.steps == [2, 4, 6, 8] and len(report.layers) == 4
    assert len(report.snapshots) == 4 * 4
    for name in ("formation.json", "formation.md", "entropy_over_training.png",
                 "concept_trajectories.png"):
        assert (tmp_path / "f" / name).is_file(), name
    data = json.loads((tmp_path / "f" / "formation.json").read_text())
    assert 0.0 <= data["stable_fraction_topk"] <= 1.0
    assert len(data["layers"][0]["concept"][0]) == 4


def test_cli_formation(snapshot_run, tmp_path):
    from typer.testing import CliRunner

    from memlens.cli import app

    out, _, _, _ = snapshot_run
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    result = CliRunner().invoke(app, ["topk", "formation", "--run", str(out), "--corpus",
                                      str(corpus), "--max-blocks", "8", "--out",
                                      str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "stable over the last half" in result.output.lower()
    assert (tmp_path / "f" / "formation.md").is_file()
