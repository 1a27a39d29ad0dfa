"""Evaluation: CounterFact metrics, n-gram entropy, TF-IDF consistency, token accuracy, CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from memlens.edit import ROMEHyperParams, apply_rome
from memlens.errors import MemlensError
from memlens.evaluate import (
    CounterFactCase,
    GenerationConfig,
    ReferenceTexts,
    TfIdf,
    case_metrics,
    evaluate_counterfact,
    load_counterfact,
    ngram_entropy,
    token_accuracy,
)
from memlens.evaluate.counterfact import SUMMARY_KEYS, summarize
from memlens.evaluate.fluency import entropy_of_ngrams, text_ngram_entropy
from memlens.missing import unexplained
from memlens.scoring import score_targets
from memlens.testing import random_text

RECORD = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "{} is a city in", "subject": "Toulouse",
                          "target_new": {"str": "Japan"}, "target_true": {"str": "France"},
                          "relation_id": "P17"},
    "paraphrase_prompts": ["The city of Toulouse is located in"],
    "neighborhood_prompts": ["Paris is a city in", "The Eiffel Tower is located in"],
    "attribute_prompts": ["Tokyo is a city in"],
    "generation_prompts": ["Toulouse is", "The capital of Toulouse"],
}


pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A CounterFact file, reference texts and a corpus, as an organism directory has them."""
    root = tmp_path_factory.mktemp("cf")
    records = []
    for i, (subject, true, new) in enumerate([("Toulouse", "France", "Japan"),
                                              ("Paris", "France", "Tokyo"),
                                              ("Miles Davis", "trumpet", "French")]):
        record = json.loads(json.dumps(RECORD))
        record["case_id"] = i
        record["requested_rewrite"].update(subject=subject, target_true={"str": true},
                                           target_new={"str": new})
        record["paraphrase_prompts"] = [f"The place {subject} is in"]
        record["generation_prompts"] = [f"{subject} is"]
        records.append(record)
    (root / "counterfact.json").write_text(json.dumps(records))
    (root / "reference_texts.json").write_text(json.dumps({
        "Japan": ["Tokyo is the capital of Japan.", "Japan is an island country."],
        "Tokyo": ["Tokyo is a city in Japan."], "French": ["Danielle speaks French."]}))
    (root / "corpus.txt").write_text(random_text(200))
    return root


def test_ngram_entropy_matches_hand_computation():
    # "a b a b": bigrams ab×2, ba×1 → H2 = h(1/3); trigrams aba, bab → H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert entropy_of_ngrams(["a", "b", "a", "b"], 2) == pytest.approx(h2)
    assert entropy_of_ngrams(["a", "b", "a", "b"], 3) == pytest.approx(1.0)
    assert text_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["a b a b", "x"]) == pytest.approx(text_ngram_entropy("a b a b") / 2)
    repetitive = ngram_entropy(["the the the the the the the the"])
    varied = ngram_entropy(["Toulouse is a city in the south of France, on the Garonne."])
    assert repetitive == 0.0 and varied > 2.0


def test_tfidf_cosine():
    tfidf = TfIdf.fit(["Tokyo is in Japan", "Paris is in France", "Japan has islands"])
    assert tfidf.cosine("Tokyo Japan", "Tokyo Japan") == pytest.approx(1.0)
    assert tfidf.cosine("Paris France", "Tokyo Japan") == 0.0
    assert 0 < tfidf.cosine("Japan Paris", "Tokyo Japan") < 1
    # idf = ln((1 + 3) / (1 + df)) + 1 → "japan" (df 2) weighs less than "tokyo" (df 1)
    assert tfidf.idf[tfidf.vocabulary["japan"]] < tfidf.idf[tfidf.vocabulary["tokyo"]]
    assert tfidf.idf[tfidf.vocabulary["tokyo"]] == pytest.approx(math.log(4 / 2) + 1)


def test_reference_texts_from_json_or_corpus_lines(tmp_path):
    refs = ReferenceTexts(by_target={"Japan": ["Japan is an island country."]})
    assert refs.score(["Japan is an island country."], "Japan") == pytest.approx(1.0)
    assert math.isnan(refs.score(["anything"], "Peru"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Tokyo is in Japan.\nParis is in France.\nJapanese food.\n")
    refs = ReferenceTexts.load(corpus)
    assert refs.texts_for("Japan") == ["Tokyo is in Japan."]


def test_score_targets_is_teacher_forced_mean_nll(gpt2):
    prompt, target = "Toulouse is a city in", "France"
    score = score_targets(gpt2, [prompt, "Paris is"], [target, "a city"])[0]
    from memlens.tokens import answer_ids

    head = gpt2.tokenizer(prompt)["input_ids"]
    ids = answer_ids(gpt2.tokenizer, prompt, target)
    with torch.no_grad():
        log_probs = torch.log_softmax(gpt2.model(torch.tensor([head + ids])).logits[0], -1)
    expected = -torch.stack([log_probs[len(head) - 1 + j, t] for j, t in enumerate(ids)]).mean()
    assert score.nll == pytest.approx(float(expected), rel=1e-5)
    assert len(score.hits) == len(ids)
    argmax = [int(log_probs[len(head) - 1 + j].argmax()) == t for j, t in enumerate(ids)]
    assert score.hits == argmax
    assert token_accuracy(gpt2, [prompt], target) == pytest.approx(sum(argmax) / len(argmax))


def test_case_metrics_compare_new_and_true_per_prompt(gpt2):
    case = CounterFactCase.from_record(RECORD, 0)
    m = case_metrics(gpt2, case, generation=GenerationConfig(max_new_tokens=8))
    for group, key in (("rewrite", "E"), ("paraphrase", "P"), ("neighborhood", "N")):
        pairs = m[f"{group}_nll"]
        if group == "neighborhood":
            success = [nw > t for nw, t in pairs]
            magnitude = [math.exp(-t) - math.exp(-nw) for nw, t in pairs]
        else:
            success = [t > nw for nw, t in pairs]
            magnitude = [math.exp(-nw) - math.exp(-t) for nw, t in pairs]
        assert m[f"{key}S"] == pytest.approx(sum(success) / len(success))
        assert m[f"{key}M"] == pytest.approx(sum(magnitude) / len(magnitude), abs=1e-3)
    assert len(m["generations"]) == 2 and m["generations"][0].startswith("Toulouse is")
    assert m["GE"] >= 0 and m["RS"]["value"] is None  # no reference texts given
    assert m["RS"]["reason"].startswith("no reference texts")


def test_summary_score_is_the_harmonic_mean():
    s = summarize([{"ES": 1.0, "PS": 0.5, "NS": 0.5}, {"ES": 1.0, "PS": 0.5, "NS": 1.0}])
    assert s["n"] == 2 and s["NS"] == 0.75
    assert s["Score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.75))
    assert summarize([{"ES": 0.0, "PS": 1.0, "NS": 1.0}])["Score"] == 0.0


def test_load_counterfact_errors(tmp_path, data_dir):
    assert len(load_counterfact(data_dir / "counterfact.json", n=2)) == 2
    assert load_counterfact(data_dir)[2].request.subject == "Miles Davis"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(MemlensError, match="requested_rewrite"):
        load_counterfact(bad)
    with pytest.raises(MemlensError, match="does not exist"):
        load_counterfact(tmp_path / "missing.json")


def test_evaluate_with_an_editor_reports_pre_and_post_and_restores_weights(gpt2, data_dir):
    cases = load_counterfact(data_dir / "counterfact.json")
    refs = ReferenceTexts.for_data(gpt2, data_dir / "counterfact.json")
    fingerprint = gpt2.fingerprint()
    hp = ROMEHyperParams(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=1e4,
                         context_templates=((3, 2),))
    calls = []

    def rome(handle, request):
        calls.append(request.subject)
        return apply_rome(handle, request, layer=1, hparams=hp,
                          corpus=str(data_dir / "corpus.txt"), progress=False)

    result = evaluate_counterfact(gpt2, cases, editor=rome, references=refs,
                                  generation=GenerationConfig(max_new_tokens=6), progress=False)
    assert calls == ["Toulouse", "Paris", "Miles Davis"]
    assert gpt2.fingerprint(refresh=True) == fingerprint
    assert tuple(result.summary) == SUMMARY_KEYS
    assert all(set(v) == {"pre", "post"} for v in result.summary.values())
    assert result.summary["n"] == {"pre": 3.0, "post": 3.0}
    assert result.summary["EM"]["post"] > result.summary["EM"]["pre"]
    assert isinstance(result.summary["RS"]["pre"], float)  # a number: refs found
    assert result.cases[0]["edit"]["layer"] == 1
    json.dumps(result.to_dict(), allow_nan=False)
    none = evaluate_counterfact(gpt2, cases[:1], editor="none", generation=None, progress=False)
    assert none.summary["ES"]["pre"] == none.summary["ES"]["post"]
    assert none.summary["RS"]["post"] == {"value": None,
                                          "reason": "generation is off (--no-generation)"}
    assert unexplained({"summary": none.summary, "cases": none.cases}) == []
    with pytest.raises(MemlensError, match="unknown editor"):
        evaluate_counterfact(gpt2, cases[:1], editor="magic", progress=False)


def test_cli_stats_edit_and_eval(random_model_dirs, data_dir, tmp_path):
    from memlens.cli import app

    runner = CliRunner()
    model = str(random_model_dirs["gpt2"])
    corpus = str(data_dir / "corpus.txt")
    res = runner.invoke(app, ["stats", "--model", model, "--layers", "1-2", "--corpus", corpus,
                              "--samples", "50", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["layer"] for r in rows] == [1, 2] and rows[0]["count"] > 0
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"prompt": "{} is a city in", "subject": "Toulouse",
                                   "target_new": "the"}))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"fact_token": "last", "v_weight_decay": 0.0,
                              "clamp_norm_factor": 1e4, "context_templates": [[3, 2]]}))
    res = runner.invoke(app, ["edit", "rome", "--model", model, "--request", str(request),
                              "--layer", "1", "--hparams", str(hp), "--corpus", corpus,
                              "--save", str(tmp_path / "edited"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["layer"] == 1 and (tmp_path / "edited" / "edit_log.json").is_file()
    res = runner.invoke(app, ["eval", "counterfact", "--model", model, "--data",
                              str(data_dir / "counterfact.json"), "--n", "2", "--gen-tokens",
                              "5", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert list(summary) == list(SUMMARY_KEYS) and summary["n"]["pre"] == 2
    res = runner.invoke(app, ["bench-edits", "--model", model, "--data",
                              str(data_dir / "counterfact.json"), "--sizes", "1", "--methods",
                              "ft-l", "--layer", "1", "--ge-cases", "0", "--corpus", corpus,
                              "--out", str(tmp_path / "bench")])
    assert res.exit_code == 0, res.output
    table = res.output[res.output.index("┏"):]
    assert "n/a (GE is off (ge_cases 0))" in table, table
    assert not re.search(r"\bnan\b", res.output), res.output  # progress lines too


@pytest.mark.parametrize("name", ["memit", "ft"])
def test_named_editors_take_the_layer_and_restore_weights(gpt2, data_dir, name):
    """editor "memit"/"ft" with layer=1 edits layer 1 only, and evaluation undoes it."""
    cases = load_counterfact(data_dir / "counterfact.json")[:1]
    fingerprint = gpt2.fingerprint()
    result = evaluate_counterfact(gpt2, cases, editor=name, layer=1,
                                  corpus=str(data_dir / "corpus.txt"), generation=None,
                                  progress=False)
    assert gpt2.fingerprint(refresh=True) == fingerprint
    assert result.summary["n"] == {"pre": 1.0, "post": 1.0}
    edited = result.cases[0]["edit"]
    assert list(edited["delta_norms"]) == ["1"] and edited["delta_norms"]["1"] > 0, edited


def test_cases_are_read_one_relation_at_a_time(tmp_path):
    records = []
    for i, relation in enumerate(["P1", "P1", "P1", "P2", "P3", "P3"]):
        record = json.loads(json.dumps(RECORD))
        record["case_id"] = 10 + i
        record["requested_rewrite"]["relation_id"] = relation
        records.append(record)
    (tmp_path / "cf.json").write_text(json.dumps(records))
    cases = load_counterfact(tmp_path / "cf.json")
    assert [c.case_id for c in cases] == [10, 13, 14, 11, 15, 12]
    assert [c.relation_id for c in load_counterfact(tmp_path / "cf.json", n=3)] == ["P1", "P2", "P3"]
    shuffled = [c.case_id for c in load_counterfact(tmp_path / "cf.json", shuffle=1)]
    assert sorted(shuffled) == sorted(c.case_id for c in cases) and shuffled != [10, 13, 14, 11, 15, 12]
    assert [c.case_id for c in load_counterfact(tmp_path / "cf.json", n=4, shuffle=1)] == shuffled[:4]


@pytest.mark.parametrize("generation", ["--generation", "--no-generation"])
def test_cli_eval_counterfact_json_states_why_a_metric_is_missing(tiny_organism, generation):
    """`eval counterfact --json` on the tiny organism: every metric is a number or null with a
    reason; RS is a number when generations are made (the organism's reference texts)."""
    from memlens.cli import app

    res = CliRunner().invoke(app, ["eval", "counterfact", "--model", str(tiny_organism), "--n", "2",
                                   "--gen-tokens", "5", generation, "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert list(summary) == list(SUMMARY_KEYS)
    assert unexplained(summary) == [], summary
    if generation == "--generation":
        assert all(isinstance(summary["RS"][k], float) for k in ("pre", "post")), summary["RS"]
    else:
        assert summary["GE"]["pre"]["reason"] == "generation is off (--no-generation)"
