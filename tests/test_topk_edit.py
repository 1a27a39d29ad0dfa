"""Tracing and editing TopK models: `trace`, `stats`, `edit rome|memit` unchanged on a tiny
TopK model, and the ROME-key study (memlens.studies.topk_edit)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memlens.testing import random_model, random_text
from memlens.topk import to_topk, topk_modules

K = 8  # of the tiny models' d_ff = 128
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")


@pytest.fixture(scope="module")
def topk_dirs(tmp_path_factory):
    """A tiny random GPT-2 converted to TopK (layers 0, 1) and its dense twin (same weights),
    saved, with a corpus for key statistics."""
    root = tmp_path_factory.mktemp("topk-edit")
    for name in ("dense", "topk"):
        model, tokenizer = random_model("gpt2")
        if name == "topk":
            to_topk(model, k=K)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "corpus.txt").write_text(random_text(200))
    return root


def _run(*args):
    from memlens.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_trace_stats_and_edits_work_unchanged_on_a_topk_model(topk_dirs, tmp_path):
    import memlens

    model, corpus = topk_dirs / "topk", topk_dirs / "corpus.txt"
    assert sorted(topk_modules(memlens.load_model(str(model), device="cpu").model)) == [0, 1]
    res = _run("trace", "--model", model, "--prompt", "Miles Davis plays", "--subject", "Davis",
               "--samples", "2", "--out", tmp_path / "trace", "--json")
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(data["scores"]) == {"hidden", "mlp", "attn"}
    rows = json.loads(_run("stats", "--model", model, "--layers", "0-1", "--corpus", corpus,
                           "--samples", "50", "--json").stdout)
    assert [r["layer"] for r in rows] == [0, 1] and rows[0]["count"] > 0
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"prompt": "{} is a city in", "subject": "Toulouse",
                                   "target_new": "the"}))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"fact_token": "last", "v_weight_decay": 0.0,
                              "clamp_norm_factor": 1e4, "context_templates": [[3, 2]]}))
    out = json.loads(_run("edit", "rome", "--model", model, "--request", request, "--layer", "0",
                          "--hparams", hp, "--corpus", corpus, "--save", tmp_path / "rome",
                          "--json").stdout)
    assert out["layer"] == 0
    edited = memlens.load_model(str(tmp_path / "rome"), device="cpu")
    assert sorted(topk_modules(edited.model)) == [0, 1]  # the saved edit is still TopK
    requests = tmp_path / "reqs.json"
    requests.write_text(json.dumps([
        {"prompt": "{} is a city in", "subject": "Toulouse", "target_new": "Japan"},
        {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "Paris"}]))
    hp_memit = tmp_path / "hp_memit.json"
    hp_memit.write_text(json.dumps({"fact_token": "last", "v_weight_decay": 0.0,
                                    "clamp_norm_factor": 1e3, "context_templates": [[4, 2]],
                                    "mom2_update_weight": 10.0, "mom2_n_samples": 200}))
    _run("edit", "memit", "--model", model, "--requests", requests, "--layers", "0-1",
         "--hparams", hp_memit, "--corpus", corpus, "--save", tmp_path / "memit", "--json")
    log = json.loads((tmp_path / "memit" / "edit_log.json").read_text())
    assert log["edits"][0]["method"] == "memit" and log["edits"][0]["layers"] == [0, 1]


def test_units_for_mass():
    import torch

    from memlens.studies.topk_edit import units_for_mass

    assert units_for_mass(torch.tensor([3.0, 0.0, 4.0])) == 2  # 16/25 < 0.9 ≤ 25/25
    assert units_for_mass(torch.tensor([0.0, 10.0, 1.0])) == 1  # 100/101 ≥ 0.9
    assert units_for_mass(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4
    assert units_for_mass(torch.zeros(3)) == 0


def test_rome_key_of_a_topk_layer_has_exactly_k_units(topk_dirs):
    import memlens
    from memlens.edit import EditRequest, ROMEHyperParams
    from memlens.studies.topk_edit import keys_markdown, rome_key_report
    from memlens.topk.data import neuron_blocks
    from memlens.topk.neurons import neuron_report

    requests = [EditRequest("{} is a city in", "Toulouse", "Japan"),
                EditRequest("{} plays the", "Miles Davis", "Paris")]
    hp = ROMEHyperParams(context_templates=((3, 2),))
    corpus = str(topk_dirs / "corpus.txt")
    results = {}
    for name in ("topk", "dense"):
        handle = memlens.load_model(str(topk_dirs / name), device="cpu")
        neurons = neuron_report(handle, neuron_blocks(handle.tokenizer, random_text(40), 32),
                                layers=[0])
        report = rome_key_report(handle, requests, layer=0, hparams=hp, corpus=corpus,
                                 neurons=neurons, n_top=3)
        results[name] = report.to_dict()
        assert len(report.cases) == 2 and report.mom2
        for case in report.cases:
            assert len(case.top_units) == 3 and len(case.top_concepts) == 3
            assert 0.0 <= case.u_mass_on_key <= 1.0
    topk, dense = results["topk"]["summary"], results["dense"]["summary"]
    assert topk["topk_k"] == K and dense["topk_k"] is None
    assert topk["key_nonzero_mean"] == K  # the key at the subject's last token: exactly k units
    assert topk["kstar_nonzero_mean"] >= K
    assert dense["key_nonzero_mean"] > 4 * K  # GELU: (almost) every unit is non-zero
    assert topk["key_units_90_mean"] <= K < dense["key_units_90_mean"]
    results["organism"], results["n"] = "random", 2
    assert "| topk | 0 | 128 | 8 |" in keys_markdown(results)


def _rome_keys(topk_dirs, tmp_path, edits: list[tuple[str, str]], *options: str) -> dict:
    """``topk rome-keys --json`` on CounterFact cases "{subject} is a city in" → new."""
    records = [{"case_id": i, "requested_rewrite": {
        "prompt": "{} is a city in", "subject": subject, "target_new": {"str": new},
        "target_true": {"str": "France"}, "relation_id": "P17"}}
        for i, (subject, new) in enumerate(edits)]
    organism = tmp_path / "organism"
    organism.mkdir()
    (organism / "counterfact.json").write_text(json.dumps(records))
    (organism / "corpus.txt").write_text((topk_dirs / "corpus.txt").read_text())
    res = _run("topk", "rome-keys", "--model", topk_dirs / "topk", "--twin", topk_dirs / "dense",
               "--organism", organism, "--n", str(len(edits)), "--layer", "0", "--out",
               tmp_path / "k", "--json", *options)
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_cli_rome_keys_compares_the_twins(topk_dirs, tmp_path):
    summary = _rome_keys(topk_dirs, tmp_path, [("Toulouse", "Japan"), ("Paris", "Tokyo")])
    assert summary["topk"]["key_nonzero_mean"] == K and summary["topk"]["n"] == 2
    assert summary["dense"]["key_nonzero_mean"] > K
    assert (tmp_path / "k" / "rome_keys.md").is_file()
    assert "counterfact" not in summary["topk"]


def test_cli_rome_keys_efficacy_edits_both_twins(topk_dirs, tmp_path):
    """--efficacy: ROME edits the same cases on both models; ES/PS/NS/Score pre and post."""
    summary = _rome_keys(topk_dirs, tmp_path, [("Toulouse", "Japan")], "--efficacy")
    for name in ("topk", "dense"):
        cf = summary[name]["counterfact"]
        assert cf["n"]["post"] == 1 and set(cf) == {"n", "ES", "PS", "NS", "Score"}
        assert 0.0 <= cf["ES"]["post"] <= 1.0
    assert "ROME on the same cases" in (tmp_path / "k" / "rome_keys.md").read_text()


def test_rome_solves_around_units_dead_in_the_key_statistics():
    import torch

    from memlens.edit.rome import left_vector

    # a trained TopK layer has units that never fire: zero rows/columns of C = E[k kᵀ]
    torch.manual_seed(0)
    keys = torch.relu(torch.randn(200, 6, dtype=torch.float64))
    keys[:, [1, 4]] = 0.0
    C = keys.T @ keys / len(keys)
    k_star = keys[0]
    u = left_vector(C, k_star, layer=0)
    live = [0, 2, 3, 5]
    assert u[[1, 4]].abs().max() == 0
    torch.testing.assert_close(C[live][:, live] @ u[live], k_star[live])


def test_topk_trained_like_the_organism_is_an_organism_directory(tiny_organism, tmp_path):
    """`topk train --like-organism`: the TopK model gets the organism's recipe and data (its
    twin is the organism itself) and its directory works as an organism's (CounterFact cases,
    editors' organism settings, its own known facts)."""
    import dataclasses

    from memlens.edit.hparams import ROMEHyperParams
    from memlens.model import load_model, organism_file
    from memlens.organisms.specs import get_spec
    from memlens.studies.topk import organism_recipe, train_like_organism

    spec = get_spec("tiny")
    organism = str(tiny_organism)  # not "organism:tiny": that would build it in this home
    cfg = organism_recipe(organism, keep_steps=())
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.seed, cfg.bf16) == (
        spec.steps, spec.batch_size, spec.lr, spec.warmup_steps, spec.seed, spec.bf16)
    pair = train_like_organism(organism, tmp_path, dataclasses.replace(cfg, steps=3))
    model_dir = tmp_path / "topk"
    assert pair.dense.path == str(tiny_organism) and pair.topk.topk["k"] >= 1
    assert json.loads((tmp_path / "pair.json").read_text())["config"]["steps"] == 3
    meta = json.loads((model_dir / "organism.json").read_text())
    assert meta["topk_twin_of"] and meta["spec"]["name"] == "tiny"
    assert organism_file(str(model_dir), "counterfact.json").read_text() == \
        (tiny_organism / "counterfact.json").read_text()
    assert isinstance(json.loads((model_dir / "known_facts.json").read_text()), list)
    handle = load_model(str(model_dir), device="cpu")
    assert topk_modules(handle.model)  # loads as TopK
    assert ROMEHyperParams.for_model(handle).layer == ROMEHyperParams.ORGANISM_DEFAULTS["layer"]
