"""P-probing: token positions, padding, subject splits, results on every architecture, a probe
that beats its controls on the tiny organism, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlens.errors import EmptyInput, MemlensError, SubjectNotFound
from memlens.probe import (
    EMBEDDINGS,
    GROUPS,
    group_states,
    parse_probe_layers,
    probe_facts,
    probe_positions,
    split_subjects,
)

NAMES = ["Miles", "Davis", "Paris", "Tokyo", "Apple", "Steve", "Jobs", "France", "Japan",
         "Eiffel"]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_facts(n_subjects: int = 16) -> list[dict[str, str]]:
    """Two relations over multi-token subjects made of the tiny tokenizer's words."""
    facts = []
    for i in range(n_subjects):
        subject = f"{NAMES[i % 10]} {NAMES[(3 * i + 1) % 10]}{i}"
        facts.append({"subject": subject, "prompt": f"{subject} plays the", "relation": "plays",
                      "attribute": ("trumpet", "piano", "drums")[i % 3]})
        facts.append({"subject": subject, "prompt": "The capital of {} is", "relation": "capital",
                      "attribute": ("Paris", "Tokyo")[i % 2]})
    return facts


def test_positions_of_a_multi_token_subject(random_handle):
    tok = random_handle.tokenizer
    prompt, subject = "The Eiffel Tower is located in", "Eiffel Tower"
    found = probe_positions(tok, prompt, subject)
    encoding = tok(prompt, return_offsets_mapping=True, add_special_tokens=True)
    offsets, n_tokens = encoding["offset_mapping"], len(encoding["input_ids"])
    start, end = prompt.index(subject), prompt.index(subject) + len(subject)
    subject_tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    assert len(subject_tokens) >= 2  # the test is about a subject of several tokens
    assert found == {"first_subject": subject_tokens[0], "last_subject": subject_tokens[-1],
                     "first_subsequent": subject_tokens[-1] + 1, "last": n_tokens - 1}
    assert prompt[slice(*offsets[found["first_subject"]])].strip().startswith("E")
    assert prompt[slice(*offsets[found["last_subject"]])].endswith("r")
    assert prompt[slice(*offsets[found["first_subsequent"]])].strip() == "is"
    at_end = probe_positions(tok, "I saw the Eiffel Tower", subject)
    assert at_end["first_subsequent"] is None and at_end["last_subject"] == at_end["last"]


def test_batched_states_equal_single_prompt_states(random_handle):
    prompts = ["Miles Davis plays the", "The capital of Japan is Tokyo and Paris"]
    subjects = ["Davis", "Japan"]
    positions = np.array([[probe_positions(random_handle.tokenizer, p, s)[g] for g in GROUPS]
                          for p, s in zip(prompts, subjects, strict=True)])
    layers = [EMBEDDINGS, 0, random_handle.n_layers - 1]
    batched = group_states(random_handle, prompts, positions, layers)
    assert batched.shape == (2, len(GROUPS), 3, random_handle.d_model)
    for i, prompt in enumerate(prompts):
        alone = group_states(random_handle, [prompt], positions[i:i + 1], layers)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)
    # the embedding "layer" is the input of block 0; block outputs differ from it
    assert not torch.allclose(batched[:, :, 0], batched[:, :, 1])


def test_split_holds_out_subjects_of_seen_objects():
    subject_objects = {f"s{i}": f"o{i % 4}" for i in range(20)} | {"lonely": "rare"}
    train, test, dropped = split_subjects(subject_objects, 0.3, np.random.default_rng(0))
    assert dropped == ["rare"] and "lonely" not in train + test
    assert not set(train) & set(test) and len(train) + len(test) == 20
    assert {subject_objects[s] for s in test} <= {subject_objects[s] for s in train}
    assert 3 <= len(test) <= 9
    again = split_subjects(subject_objects, 0.3, np.random.default_rng(0))
    assert again == (train, test, dropped)


def test_probe_runs_on_every_architecture(random_handle):
    result = probe_facts(random_handle, synthetic_facts(), seed=1)
    L = random_handle.n_layers + 1
    assert result.layers == [EMBEDDINGS, *range(random_handle.n_layers)]
    assert result.accuracy.shape == result.control.shape == (len(GROUPS), L)
    assert np.isfinite(result.accuracy).all() and np.isfinite(result.control).all()
    assert ((0 <= result.accuracy) & (result.accuracy <= 1)).all()
    assert [r.relation for r in result.relations] == ["capital", "plays"]
    assert all(r.accuracy.shape == (len(GROUPS), L) for r in result.relations)
    assert result.n_test[0] == sum(r.n_test[0] for r in result.relations) > 0
    data = json.loads(json.dumps(result.to_json()))
    assert {"groups", "layers", "layer_labels", "accuracy", "control", "chance", "n_test",
            "best", "relations", "skipped", "seed", "test_fraction"} <= set(data)
    assert data["layer_labels"][0] == "emb" and data["best"]["group"] in GROUPS


def test_probe_errors(random_handle):
    facts = synthetic_facts()
    facts[5] = {**facts[5], "prompt": "Nobody is here"}
    with pytest.raises(SubjectNotFound, match="fact 5"):
        probe_facts(random_handle, facts)
    one_object = [{**f, "attribute": "Paris"} for f in synthetic_facts()]
    with pytest.raises(EmptyInput, match="too few facts or classes"):
        probe_facts(random_handle, one_object)
    with pytest.raises(MemlensError, match="do not exist"):
        probe_facts(random_handle, synthetic_facts(), layers=[random_handle.n_layers])


def test_parse_probe_layers():
    assert parse_probe_layers("emb,0-2") == [EMBEDDINGS, 0, 1, 2]
    assert parse_probe_layers("3,1") == [1, 3]
    with pytest.raises(MemlensError):
        parse_probe_layers("x")


def test_probe_finds_the_attribute_on_the_tiny_organism(tiny_handle, tiny_organism):
    from memlens.trace import load_facts

    facts = load_facts(tiny_organism / "known_facts.json")
    result = probe_facts(tiny_handle, facts, seed=0)
    best = result.best()
    assert best["accuracy"] >= best["control"] + 0.3, best
    assert best["accuracy"] >= best["chance"] + 0.3, best


def test_cli_probe(tiny_organism, tmp_path):
    from typer.testing import CliRunner

    from memlens.cli import app

    out = tmp_path / "probe"
    res = CliRunner().invoke(app, ["probe", "--model", str(tiny_organism), "--facts",
                                   str(tiny_organism / "known_facts.json"), "--layers", "emb,0-1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "probe.json").read_text())
    assert data["layers"] == [EMBEDDINGS, 0, 1] and len(data["accuracy"]) == len(GROUPS)
    assert (out / "probe.png").stat().st_size > 10_000
    missing = CliRunner().invoke(app, ["probe", "--model", str(tiny_organism), "--facts",
                                       str(tmp_path / "nope.json"), "--out", str(out)])
    assert isinstance(missing.exception, MemlensError) and "nope.json" in str(missing.exception)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    malformed = CliRunner().invoke(app, ["probe", "--model", str(tiny_organism), "--facts",
                                         str(broken), "--out", str(out)])
    assert isinstance(malformed.exception, MemlensError), malformed.output
