"""Published file layouts read as they are (issue 21): CounterFact (counterfact.json), zsRE
(zsre_mem_eval.json), known facts (known_1000.json) and Pile-style paragraph jsonl. The samples
are written here in the published layouts (field names and nesting), with our own values."""

from __future__ import annotations

import json

import pytest

from memlens.edit.requests import EditRequest, SubjectNotFound, load_requests
from memlens.evaluate import load_counterfact
from memlens.evaluate.zsre import load_zsre, zsre_metrics
from memlens.trace import load_facts

pytestmark = pytest.mark.usefixtures("isolated_home", "one_thread")

COUNTERFACT = [
    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"},
                           "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
     "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
    {"case_id": 1, "pararel_idx": 1,
     "requested_rewrite": {"prompt": "{} is a city in", "relation_id": "P17",
                           "target_new": {"str": "Japan", "id": "Q17"},
                           "target_true": {"str": "France", "id": "Q142"},
                           "subject": "Toulouse"},
     "paraphrase_prompts": ["Paris plays. Toulouse is located in"],
     "neighborhood_prompts": ["Paris is a city in"],
     "attribute_prompts": ["Tokyo is a city in"],
     "generation_prompts": ["Toulouse is known for"]},
]

ZSRE = [
    {"subject": "Toulouse", "src": "Which country is Toulouse in?", "pred": "France",
     "rephrase": "In which country is Toulouse located?", "alt": "Japan",
     "answers": ["France"], "loc": "nq question: who plays the trumpet in miles davis band",
     "loc_ans": "Miles Davis", "cond": "France >> Japan || Which country is Toulouse in?"},
    {"subject": "Apple", "src": "Who founded Apple?", "pred": "Steve Jobs",
     "rephrase": "Apple was founded by whom?", "alt": "Miles Davis",
     "answers": ["Steve Jobs"], "loc": "nq question: what is the capital of japan",
     "loc_ans": "Tokyo", "cond": "Steve Jobs >> Miles Davis || Who founded Apple?"},
]

KNOWN = [
    {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
     "template": "{} is located in the continent", "prediction": " Antarctica",
     "prompt": "Vinson Massif is located in the continent", "relation_id": "P30"},
    {"known_id": 1, "subject": "Beats Music", "attribute": "Apple",
     "template": "{} is owned by", "prediction": " Apple",
     "prompt": "Beats Music is owned by", "relation_id": "P127"},
]


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_published_counterfact(tmp_path):
    path = _write(tmp_path, "counterfact.json", COUNTERFACT)
    cases = load_counterfact(path)
    assert [c.request.case_id for c in cases] == [0, 1]
    first = cases[0]
    assert (first.request.target_new, first.request.target_true) == ("English", "French")
    assert first.relation_id == "P103"
    assert first.paraphrase_prompts and first.neighborhood_prompts and first.generation_prompts
    assert [r.subject for r in load_requests(path)] == ["Danielle Darrieux", "Toulouse"]
    facts = load_facts(path)  # trace reads the same file
    assert facts[1] == {"prompt": "Toulouse is a city in", "subject": "Toulouse",
                        "attribute": "France"}


def test_published_known_1000(tmp_path):
    facts = load_facts(_write(tmp_path, "known_1000.json", KNOWN))
    assert facts[0] == {"prompt": "Vinson Massif is located in the continent",
                        "subject": "Vinson Massif", "attribute": "Antarctica",
                        "relation": "P30"}
    assert facts[1]["relation"] == "P127"


def test_published_zsre(tmp_path, gpt2):
    path = _write(tmp_path, "zsre_mem_eval.json", ZSRE)
    cases = load_zsre(path)
    request = cases[0].request
    assert (request.prompt, request.subject, request.target_new, request.target_true) == (
        "Which country is {} in?", "Toulouse", "Japan", "France")
    assert cases[0].paraphrase_prompts == ["In which country is Toulouse located?"]
    assert (cases[1].loc_ans, cases[1].answers) == ("Tokyo", ["Steve Jobs"])
    # the edit commands read the same file (memlens edit rome --request zsre_mem_eval.json)
    assert [r.target_new for r in load_requests(path)] == ["Japan", "Miles Davis"]
    metrics = zsre_metrics(gpt2, cases)
    assert metrics["n"] == 2
    for key in ("efficacy", "paraphrase", "specificity"):
        assert 0.0 <= metrics[key] <= 1.0


def test_zsre_subject_not_in_question():
    record = dict(ZSRE[0], subject="Lyon")
    with pytest.raises(SubjectNotFound, match="Lyon"):
        EditRequest.from_dict(record, index=3)


def test_pile_style_jsonl(tmp_path, gpt2):
    from memlens.memorization.data import load_paragraphs
    from memlens.testing import random_text

    lines = random_text(3, 60, seed=4).splitlines()
    path = tmp_path / "pile.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}})
                              for t in lines) + "\n")
    paragraphs = load_paragraphs(gpt2, path, prefix_len=16, suffix_len=16)
    assert len(paragraphs) == 3
    assert all(len(p.token_ids) == 32 for p in paragraphs)
    assert [p.id for p in paragraphs] == ["0", "1", "2"]


def test_eval_zsre_command_and_rome(tmp_path, gpt2, random_model_dirs, corpus):
    from typer.testing import CliRunner

    from memlens.cli import app
    from memlens.evaluate import evaluate_zsre

    path = _write(tmp_path, "zsre_mem_eval.json", ZSRE)
    result = CliRunner().invoke(app, ["eval", "zsre", "--data", str(path), "--model",
                                      str(random_model_dirs["gpt2"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pre"]["n"] == 2
    edited = evaluate_zsre(gpt2, load_zsre(path, n=1), editor="rome", layer=1,
                           corpus=str(corpus))
    assert edited["setup"]["editor"] == "rome" and edited["post"]["n"] == 1
    assert edited["post"]["efficacy"] >= edited["pre"]["efficacy"]
