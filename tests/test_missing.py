"""Every `--json` output and result file states why a metric is missing (memlens.missing):
bench-edits, trace-avg and organism eval on the `tiny` organism, and the cases no model gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from memlens.cli import app
from memlens.edit import EditRequest
from memlens.evaluate.counterfact import CounterFactCase, bench_reasons
from memlens.missing import is_missing, unexplained
from memlens.trace.average import GROUPS, AverageTrace


def _json(args: list[str]) -> dict:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_bench_edits_json_explains_ge_off(tiny_organism, tmp_path):
    """`bench-edits --ge-cases 0 --json`: GE of every point is null with the reason; the
    progress lines say it too; no other NaN/None (unset hyper-parameters are left out)."""
    out = tmp_path / "bench"
    data = _json(["bench-edits", "--model", str(tiny_organism), "--sizes", "1", "--methods",
                  "memit,ft-l", "--layers", "0-1", "--layer", "0", "--ge-cases", "0", "--out",
                  str(out), "--json"])
    assert unexplained(data) == [], data
    assert unexplained(json.loads((out / "scaling.json").read_text())) == []
    off = {"value": None, "reason": "GE is off (ge_cases 0)"}
    assert [p["GE"] for p in data["points"]] == [off] * len(data["methods"])
    assert data["pre"]["1"]["GE"] == off
    assert all(isinstance(p["Score"], float) for p in data["points"])


def _case(generation: bool) -> CounterFactCase:
    return CounterFactCase(request=EditRequest(prompt="{} is in", subject="Paris",
                                               target_new="Rome", target_true="France"),
                           paraphrase_prompts=["Paris lies in"],
                           neighborhood_prompts=["Lyon is in"],
                           generation_prompts=["Paris is"] if generation else [])


def test_bench_reasons_follow_the_cases_measured_at_n():
    """GE is measured on the first min(n, ge_cases) cases given (bench passes its valid cases):
    at n=1 only the first counts, even with ge_cases 5."""
    cases = [_case(generation=False), _case(generation=True)]
    assert bench_reasons(cases, 1, 5) == {"GE": "no generation prompts in the evaluated case(s)"}
    assert bench_reasons(cases, 2, 5) == {}
    assert bench_reasons(cases, 2, 0) == {"GE": "GE is off (ge_cases 0)"}


def test_average_over_no_fact_says_why_in_json():
    """An AverageTrace with nothing traced: AIE rows, means and the recall site are missing
    with the skip counts; the arrays stay NaN for the plots."""
    skipped = [{"prompt": "Paris is in", "subject": "Paris", "reason": "model predicts 'the'"}]
    avg = AverageTrace(kinds=["mlp"], n_layers=3, aie={"mlp": np.full((len(GROUPS), 3), np.nan)},
                       group_counts=dict.fromkeys(GROUPS, 0), ate=math.nan, p_clean=math.nan,
                       p_corrupted=math.nan, n_facts=0, n_skipped_wrong=1, n_skipped_invalid=0,
                       noise=0.1, samples=2, skipped=skipped)
    data = avg.to_json()
    assert unexplained(data) == [], data
    assert all(is_missing(row) for row in data["aie"]["mlp"])
    assert data["ate"]["reason"].startswith("no fact was traced: of 1 facts, the model answered "
                                            "1 wrongly")
    assert is_missing(data["recall_site"]["aie_last_token"]["mlp"]["layer"])
    assert np.isnan(avg.aie["mlp"]).all()


def test_trace_avg_json_explains_groups_without_tokens(tiny_organism, tmp_path):
    """`trace-avg --json` on tiny: a token group no traced fact has (e.g. middle subject
    tokens) is one missing row naming the group; everything else is a number."""
    out = tmp_path / "avg"
    data = _json(["trace-avg", "--model", str(tiny_organism), "--facts",
                  str(tiny_organism / "known_facts.json"), "--n", "2", "--samples", "2",
                  "--kind", "mlp", "--out", str(out), "--json"])
    assert unexplained(data) == [], data
    assert unexplained(json.loads((out / "trace_avg.json").read_text())) == []
    assert data["n_facts"] >= 1 and isinstance(data["ate"], float)
    for kind in data["kinds"]:
        for group, row in zip(data["groups"], data["aie"][kind], strict=True):
            if data["group_counts"][group]:
                assert all(isinstance(x, float) for x in row), (group, row)
            else:
                assert row["reason"].startswith("no ") and "traced facts" in row["reason"]
    assert (out / "avg_lines.png").is_file()


@pytest.mark.slow
def test_organism_eval_json_explains_what_it_did_not_compute(tiny_organism, monkeypatch):
    """`organism eval tiny --json`: recall_site not requested is null with the way to ask."""
    monkeypatch.setenv("MEMLENS_HOME", str(tiny_organism.parents[1]))  # where tiny was built
    data = _json(["organism", "eval", "tiny", "--json"])
    assert unexplained(data) == [], data
    assert "--recall-site" in data["recall_site"]["reason"]
    assert isinstance(data["fact_accuracy"], float)
