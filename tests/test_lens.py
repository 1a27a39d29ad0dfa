"""Logit lens and attribute rate (Geva et al. 2023, §5): the last layer's lens is the model's own
output on every architecture; rates count attribute tokens among the top k; attribute files,
averages on the tiny organism and the CLI behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memlens.errors import EmptyInput, InputFileError, InvalidArgument, MemlensError
from memlens.lens import (
    KINDS,
    attribute_ids,
    average_lens,
    default_top_k,
    lens_fact,
    lens_logits,
    load_attributes,
    plot_average_lens,
    plot_lens,
)
from memlens.trace import GROUPS

PROMPT = "Miles Davis plays the trumpet"
SUBJECT = "Davis"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_last_layer_residual_lens_is_the_models_logits(random_handle):
    ids = random_handle.encode([PROMPT]).input_ids
    with torch.no_grad():
        logits = random_handle.model(input_ids=ids, use_cache=False).logits[0]
    lens = lens_logits(random_handle, ids, "residual")
    assert lens.shape == (random_handle.n_layers, ids.shape[1], logits.shape[-1])
    torch.testing.assert_close(lens[-1], logits, rtol=0, atol=1e-5)
    # an earlier layer's lens is not the output: the check can fail
    assert (lens[0] - logits).abs().max() > 1e-3


def test_attribute_rate_counts_attribute_tokens_among_the_top_k(random_handle):
    attributes = ["France", "trumpet", "Tokyo"]
    result = lens_fact(random_handle, PROMPT, SUBJECT, attributes, k=20)
    wanted = attribute_ids(random_handle.tokenizer, attributes)
    T, L = len(result.tokens), random_handle.n_layers
    for kind in KINDS:
        assert result.top[kind].shape == (T, L, 20)
        expected = np.isin(result.top[kind], wanted).mean(axis=-1)
        np.testing.assert_array_equal(result.rate[kind], expected)
    ids = random_handle.encode([PROMPT]).input_ids
    top = lens_logits(random_handle, ids, "mlp")[2, 3].topk(20).indices.tolist()
    assert result.top_at("mlp", token=3, layer=2) == top
    assert result.chance == pytest.approx(len(wanted) / random_handle.config.vocab_size)
    json.dumps(result.to_json(random_handle.tokenizer))
    assert plot_lens(result).axes


def test_top_k_scales_with_the_vocabulary_and_bad_input_fails(random_handle):
    assert [default_top_k(v) for v in (50257, 200_000, 2048, 320, 3)] == [50, 50, 5, 5, 3]
    with pytest.raises(InvalidArgument, match="k must be"):
        lens_fact(random_handle, PROMPT, SUBJECT, ["France"], k=0)
    with pytest.raises(InvalidArgument, match="lens kind"):
        lens_fact(random_handle, PROMPT, SUBJECT, ["France"], kinds=["hidden"])
    with pytest.raises(EmptyInput):
        lens_fact(random_handle, PROMPT, SUBJECT, [" "])


def test_load_attributes_from_every_format(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"Toulouse": ["France", "Garonne"]}))
    assert load_attributes(plain) == {"Toulouse": ["France", "Garonne"]}
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([
        {"relation": "capital", "subject": "France", "object": "Paris"},
        {"relation": "currency", "subject": "France", "object": "Euro"},
        {"prompt": "{} is in", "subject": "Toulouse", "attribute": "France"},
        {"requested_rewrite": {"prompt": "{} is in", "subject": "Rome",
                               "target_true": {"str": "Italy"}}},
        {"relation": "capital", "subject": "France", "object": "Paris"},
    ]))
    assert load_attributes(facts) == {"France": ["Paris", "Euro"], "Toulouse": ["France"],
                                      "Rome": ["Italy"]}
    for bad in ('{"Toulouse": "France"}', "[{\"subject\": \"x\"}]", "not json", "3"):
        path = tmp_path / "bad.json"
        path.write_text(bad)
        with pytest.raises(InputFileError):
            load_attributes(path)
    with pytest.raises(InputFileError):
        load_attributes(tmp_path / "missing.json")


# ── the tiny organism ───────────────────────────────────────────────────────


def test_average_lens_on_the_tiny_organism(tiny_handle, tiny_organism):
    from memlens.trace import load_facts, select_facts

    facts = select_facts(load_facts(tiny_organism / "known_facts.json"), 6)
    attributes = load_attributes(tiny_organism / "facts.json")
    avg = average_lens(tiny_handle, facts, attributes, progress=False)
    assert avg.n_facts >= 3 and avg.k == default_top_k(tiny_handle.config.vocab_size)
    for kind in KINDS:
        assert avg.rate[kind].shape == (len(GROUPS), tiny_handle.n_layers)
        assert np.isfinite(avg.at(kind, "last_subject")).all()
        assert ((avg.at(kind, "last") >= 0) & (avg.at(kind, "last") <= 1)).all()
    # a known fact's answer is the model's top token at the last position: the residual lens
    # of the last layer there contains an attribute
    assert avg.at("residual", "last")[-1] >= 1 / avg.k - 1e-12
    assert 0 < avg.chance < 1
    json.dumps(avg.to_json())
    assert plot_average_lens(avg).axes
    missing = average_lens(tiny_handle, facts[:1], {}, progress=False)
    assert missing.n_facts == 0 and missing.n_skipped_invalid == 1


def test_cli_lens_one_fact_and_average(random_model_dirs, tiny_organism, tmp_path):
    from memlens.cli import app

    runner = CliRunner()
    attributes = tmp_path / "attributes.json"
    attributes.write_text(json.dumps({SUBJECT: ["trumpet", "jazz"]}))
    out = tmp_path / "one"
    res = runner.invoke(app, ["lens", "--model", str(random_model_dirs["gpt_neox"]), "--prompt",
                              PROMPT, "--subject", SUBJECT, "--attributes", str(attributes),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "attribute rate" in res.output
    data = json.loads((out / "lens.json").read_text())
    assert set(data["rate"]) == set(KINDS) and (out / "lens.png").stat().st_size

    out = tmp_path / "avg"
    res = runner.invoke(app, ["lens", "--model", str(tiny_organism), "--facts",
                              str(tiny_organism / "known_facts.json"), "--attributes",
                              str(tiny_organism / "facts.json"), "--n", "3", "--kind",
                              "residual,mlp", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kinds"] == ["residual", "mlp"]
    assert (out / "lens_avg.json").exists() and (out / "lens_avg.png").exists()

    res = runner.invoke(app, ["lens", "--model", str(random_model_dirs["gpt2"]), "--prompt",
                              PROMPT, "--subject", SUBJECT, "--out", str(tmp_path / "bad")])
    assert isinstance(res.exception, MemlensError) and "--attributes" in str(res.exception)
