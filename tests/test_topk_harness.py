"""`memlens topk eval`: lm-evaluation-harness on the tiny organism and its TopK conversion,
offline, checked against the models' own log-probabilities (memlens.evaluate.harness, .lm,
.lm_table; the organism's tasks in memlens.studies.organism_tasks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 60  # items per task (and held-out blocks) in the end-to-end run

# The CLI in a subprocess with the network shut: any TCP/UDP connect raises, the hub and the
# datasets library are told they are offline; the harness must run on local files alone.
OFFLINE_CLI = """
import socket, sys
def _refuse(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"network access attempted: {address}")
    return _connect(self, address, *args, **kwargs)
_connect = socket.socket.connect
socket.socket.connect = _refuse
socket.create_connection = lambda address, *a, **k: _refuse(
    socket.socket(socket.AF_INET), address)
from memlens.cli import main
main()
"""


def _need_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        reason = "lm-eval is not installed (pip install 'memlens[eval]'; make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _offline_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ── the local tasks ─────────────────────────────────────────────────────────


def test_local_tasks_are_the_organisms_facts_in_held_out_templates(tiny_organism, tmp_path):
    from memlens.organisms.corpus import heldout_templates
    from memlens.studies.organism_tasks import write_local_tasks

    facts = json.loads((tiny_organism / "facts.json").read_text())
    counts = write_local_tasks(tiny_organism, tmp_path / "a")
    assert counts == {"organism_cloze": 3 * len(facts), "organism_mc": len(facts)}
    cloze = _lines(tmp_path / "a" / "organism_cloze.jsonl")
    expected = {(t.format(f["subject"]), f["object"]) for f in facts
                for t in heldout_templates(f["relation"])}
    assert {(d["context"], d["target"]) for d in cloze} == expected
    objects = {}
    for f in facts:
        objects.setdefault(f["relation"], set()).add(f["object"])
    truth = {(f["relation"], f["subject"]): f["object"] for f in facts}
    for doc in _lines(tmp_path / "a" / "organism_mc.jsonl"):
        assert doc["choices"][doc["gold"]] == truth[(doc["relation"], doc["subject"])]
        assert len(set(doc["choices"])) == len(doc["choices"]) == min(4, len(
            objects[doc["relation"]]))
        assert set(doc["choices"]) <= objects[doc["relation"]]
        assert any(doc["context"] == t.format(doc["subject"])
                   for t in heldout_templates(doc["relation"]))
    golds = [d["gold"] for d in _lines(tmp_path / "a" / "organism_mc.jsonl")]
    assert len(set(golds)) == 4  # the answer is not always in one place
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((tmp_path / "a" / "organism_mc.yaml").read_text())
    assert config["task"] == "organism_mc" and config["output_type"] == "multiple_choice"
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == (tmp_path / "a" / "organism_mc.jsonl").resolve()
    write_local_tasks(str(tiny_organism), tmp_path / "b")  # deterministic
    for name in ("organism_cloze.jsonl", "organism_mc.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_paired_gap_and_its_standard_error():
    from memlens.evaluate import harness
    from memlens.evaluate.lm_table import compare
    from memlens.studies import organism_tasks

    assert organism_tasks.HELDOUT == harness.HELDOUT  # a copy: the study is light at import
    a = harness.Measure(0.5, 0.1, 4, True, "harness", "mean", {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0})
    b = harness.Measure(0.25, 0.1, 4, True, "harness", "mean", {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0})
    (row,) = compare({"model": {("t", "acc"): a}, "twin": {("t", "acc"): b}}, [("t", "acc")])
    assert row.gap == pytest.approx(0.25) and row.paired and row.gap_kind == "difference"
    assert row.gap_stderr == pytest.approx(0.25)  # s.d. of (0, 0, 1, 0) / 2
    losses = [1.0, 2.0, 3.0]
    ppl = harness.heldout_measure(losses)
    assert ppl.value == pytest.approx(math.exp(2.0))
    assert ppl.stderr == pytest.approx(ppl.value * 1.0 / 3 ** 0.5)  # delta method
    twin = harness.heldout_measure([0.5, 1.5, 2.5])
    (row,) = compare({"model": {("p", "perplexity"): ppl}, "twin": {("p", "perplexity"): twin}},
                     [("p", "perplexity")])
    assert row.gap_kind == "ratio" and row.gap == pytest.approx(math.exp(0.5))
    assert row.gap_stderr == pytest.approx(0.0, abs=1e-12)  # every block 0.5 nats worse
    unpaired = harness.Measure(0.25, 0.1, 4, True, "harness")
    (row,) = compare({"model": {("t", "acc"): a}, "twin": {("t", "acc"): unpaired}},
                     [("t", "acc")])
    assert not row.paired and row.gap_stderr == pytest.approx((0.1 ** 2 * 2) ** 0.5)


def test_missing_harness_is_a_one_line_error(tiny_organism, tmp_path, monkeypatch, capsys):
    from memlens.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.setattr(sys, "argv", ["memlens", "topk", "eval", "--model", str(tiny_organism),
                                      "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'memlens[eval]'" in lines[0], lines
    assert not (tmp_path / "e").exists()  # nothing written, no model loaded


def test_unknown_task_names_and_missing_organisms_are_errors(tiny_organism, tmp_path):
    from memlens.errors import InvalidArgument
    from memlens.evaluate.harness import check_known
    from memlens.studies.organism_tasks import evaluate_pair

    known = ["hellaswag", "lambada_openai", "organism_cloze", "organism_mc"]
    with pytest.raises(InvalidArgument, match="organism_clze.*did you mean.*organism_cloze"):
        check_known(["organism_clze"], known)
    check_known(["organism_mc", "hellaswag"], known)
    with pytest.raises(InvalidArgument, match="organism"):
        evaluate_pair(str(tmp_path), tasks="organism_cloze", out=tmp_path / "v")  # no facts
    with pytest.raises(InvalidArgument, match="no tasks"):
        evaluate_pair(str(tiny_organism), tasks=" , ", out=tmp_path / "w")
    with pytest.raises(InvalidArgument, match="heldout_ppl needs a text"):
        evaluate_pair(str(tmp_path), tasks="heldout_ppl", out=tmp_path / "x")  # no corpus


# ── end to end ──────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_topk(tiny_organism, tmp_path_factory):
    """The tiny organism converted to TopK (k = d_ff/16 = 32, layers 0-1), saved."""
    from memlens.model import load_model
    from memlens.topk import to_topk

    handle = load_model(str(tiny_organism), device="cpu")
    to_topk(handle.model, k=handle.d_ff // 16)
    out = tmp_path_factory.mktemp("tiny-topk")
    handle.model.save_pretrained(out)
    handle.tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def _continuation(handle, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether every continuation token is the greedy one,
    from the model's own logits (the harness's definition, computed independently)."""
    tok = handle.tokenizer
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx):]
    assert whole[:len(ctx)] == ctx and cont
    logits = handle.model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
    rows = logits[len(ctx) - 1:len(whole) - 1]  # (len(cont), vocab)
    target = torch.tensor(cont)
    ll = rows.gather(-1, target[:, None]).sum().item()
    return ll, bool((rows.argmax(-1) == target).all())


def test_topk_eval_runs_the_harness_end_to_end_offline(tiny_organism, tiny_topk, tmp_path):
    from memlens.model import load_model
    from memlens.topk.data import read_corpus_text, text_blocks
    from memlens.trainer import evaluate_loss

    _need_lm_eval()
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_CLI, "topk", "eval", "--model", str(tiny_topk),
         "--twin", str(tiny_organism), "--organism", str(tiny_organism), "--limit", str(LIMIT),
         "--bootstrap-iters", "200", "--out", str(out), "--json"],
        capture_output=True, text=True, env=_offline_env(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network access attempted" not in proc.stderr
    table = json.loads(proc.stdout)
    assert json.loads((out / "eval.json").read_text()) == table

    models = table["models"]
    assert models["model"]["topk"]["k"] == 32 and models["model"]["topk"]["layers"] == [0, 1]
    assert models["twin"]["topk"] is None
    assert (models["model"]["label"], models["twin"]["label"]) == ("TopK (k=32)", "dense")
    rows = {(r["task"], r["metric"]): r for r in table["rows"]}
    assert list(rows) == [("organism_cloze", "acc"), ("organism_cloze", "perplexity"),
                          ("organism_mc", "acc"), ("organism_mc", "acc_norm"),
                          ("heldout_ppl", "perplexity")]
    for key, row in rows.items():
        assert row["n"] == LIMIT, key
        for role in ("model", "twin"):
            assert isinstance(row["values"][role], float), key
            assert isinstance(row["stderrs"][role], float) and row["stderrs"][role] > 0, key
        assert row["paired"] and isinstance(row["gap_stderr"], float), key
        if row["gap_kind"] == "ratio":
            assert row["gap"] == pytest.approx(row["values"]["model"] / row["values"]["twin"])
        else:
            assert row["gap"] == pytest.approx(row["values"]["model"] - row["values"]["twin"])
        if row["metric"] == "acc":  # the harness's binomial standard error
            p = row["values"]["model"]
            assert row["stderrs"]["model"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5)
    assert rows[("heldout_ppl", "perplexity")]["source"] == "memlens"
    assert rows[("organism_cloze", "acc")]["source"] == "harness"
    markdown = (out / "eval.md").read_text()
    assert "| task | metric | n | TopK (k=32) | dense | TopK (k=32) vs dense |" in markdown
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tasks" / "organism_cloze.yaml").is_file()
    assert json.loads((out / "harness_model.json").read_text())["results"]["organism_mc"]

    # The harness saw the models memlens loads, TopK layers included: its per-item numbers are
    # the models' own log-probabilities, and the TopK model's differ from the dense one's.
    cloze = _lines(out / "tasks" / "organism_cloze.jsonl")[:8]
    mc = _lines(out / "tasks" / "organism_mc.jsonl")[:8]
    corpus = read_corpus_text(str(tiny_organism))
    nll = {}
    for role, ref in (("model", tiny_topk), ("twin", tiny_organism)):
        handle = load_model(str(ref), device="cpu")
        items = {(s["task"], s["item"]): s for s in _lines(out / f"samples_{role}.jsonl")}
        for i, doc in enumerate(cloze):
            ll, greedy = _continuation(handle, doc["context"], " " + doc["target"])
            sample = items[("organism_cloze", i)]
            assert sample["perplexity"] == pytest.approx(-ll, abs=1e-4)  # NLL per item
            assert sample["acc"] == float(greedy)
        nll[role] = [items[("organism_cloze", i)]["perplexity"] for i in range(len(cloze))]
        for i, doc in enumerate(mc):
            scores = [_continuation(handle, doc["context"], " " + c)[0] for c in doc["choices"]]
            assert items[("organism_mc", i)]["acc"] == float(
                max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
        _, heldout = text_blocks(handle.tokenizer, corpus, 128)
        expected = torch.tensor(evaluate_loss(handle.model, heldout[:LIMIT])).exp().item()
        assert rows[("heldout_ppl", "perplexity")]["values"][role] == pytest.approx(expected,
                                                                                    rel=1e-5)
    assert nll["model"] != pytest.approx(nll["twin"], abs=1e-3)
