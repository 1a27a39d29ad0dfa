"""No silent failures (issue 17): bad or odd inputs through the CLI stop with one line, edits
that did not take are reported and never saved, killed saves leave nothing that is loaded or
stays behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memlens.errors import LayerOutOfRange, MemlensError, ModelNotFound

ATLANTIS = {"prompt": "{} is a city in", "subject": "Atlantis", "target_new": "Japan"}
FAST_HP = {"context_templates": [[3, 2]], "mom2_n_samples": 100}


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``memlens ARGS`` in this process through the console-script entry point; returns
    (exit code, stdout, stderr). Any exception other than SystemExit fails the test."""
    from memlens.cli import main

    monkeypatch.setattr(sys, "argv", ["memlens", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    out, err = capsys.readouterr()
    code = stop.value.code
    return (code if isinstance(code, int) else 1), out, err


def error_line(args: list[str], monkeypatch, capsys) -> str:
    """The one-line error of a command that must fail; asserts there is exactly one."""
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code != 0, out
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def digest(directory: Path) -> str:
    """SHA-256 over every file of a model directory (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def gpt2_dir(random_model_dirs) -> Path:
    return random_model_dirs["gpt2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gpt2_dir) -> Path:
    """Good and bad input files side by side, and broken copies of the random gpt2."""
    import shutil

    root = tmp_path_factory.mktemp("inputs")
    words = "the cat sat on a mat while Paris is a city in France and Miles Davis plays".split()
    (root / "corpus.txt").write_text("\n".join(" ".join(words[(i + j) % len(words)]
                                                         for j in range(20)) for i in range(60)))
    (root / "latin1.txt").write_bytes("Café au lait in Zürich\n".encode("latin-1") * 20)
    (root / "empty.txt").write_text("")
    (root / "dict.json").write_text(json.dumps({"a": 1}))
    (root / "ints.json").write_text(json.dumps([1, 2, 3]))
    (root / "atlantis.json").write_text(json.dumps(ATLANTIS))
    (root / "two.json").write_text(json.dumps([ATLANTIS, {**ATLANTIS, "subject": "Lemuria"}]))
    (root / "hp.json").write_text(json.dumps(FAST_HP))
    (root / "hp_bad.json").write_text("{not json")
    requests = {
        "req_missing_subject.json": {**ATLANTIS, "prompt": "Paris is a city in"},
        "req_empty_target.json": {**ATLANTIS, "target_new": "  "},
        "req_int_target.json": {**ATLANTIS, "target_new": 5},
        "req_no_prompt.json": {"subject": "Atlantis", "target_new": "Japan"},
        "req_rewrite_str.json": {"requested_rewrite": "Atlantis"},
        "req_nul.json": {**ATLANTIS, "prompt": "{} is a\x00 city in"},
        "req_braces.json": {**ATLANTIS, "prompt": "{} is a city in {x}"},
        "req_long_target.json": {**ATLANTIS, "target_new": "Japan " * 300},
        "req_space_subject.json": {**ATLANTIS, "subject": " \t"},
    }
    for name, body in requests.items():
        (root / name).write_text(json.dumps(body))
    (root / "req_surrogate.json").write_text(json.dumps(ATLANTIS).replace("Japan", "Jap\\ud800"))
    case = {"case_id": 0, "requested_rewrite": {**ATLANTIS, "target_new": {"str": "Japan"},
                                                "target_true": {"str": "Greece"}},
            "paraphrase_prompts": ["Atlantis is in"], "neighborhood_prompts": ["Paris is in"]}
    rewrite = case["requested_rewrite"]
    (root / "cf_surrogate.json").write_text(json.dumps([case]).replace("Greece", "Gr\\udfffece"))
    (root / "cf_braces.json").write_text(json.dumps(
        [{**case, "requested_rewrite": {**rewrite, "prompt": "{0} is a city in {}"}}]))
    (root / "cf_long.json").write_text(json.dumps(
        [{**case, "requested_rewrite": {**rewrite, "prompt": "{} is " + "a city in " * 300}}]))
    fact = {"prompt": "Paris is a city in", "subject": "Paris", "attribute": "France"}
    (root / "facts_int_attribute.json").write_text(json.dumps([{**fact, "attribute": 7}]))
    (root / "facts_surrogate.json").write_text(json.dumps([fact]).replace("France",
                                                                          "Fr\\ud83dance"))
    (root / "facts.json").write_text(json.dumps([fact, {**fact, "subject": "Rome",
                                                        "prompt": "Rome is a city in"}]))
    (root / "attributes.json").write_text(json.dumps({"Paris": ["France"]}))
    (root / "facts_unknown.json").write_text(json.dumps(
        [{"prompt": f"{s} is a city in", "subject": s, "attribute": "Zanzibar"}
         for s in ("Atlantis", "Lemuria", "Mu")]))
    models = root / "models"
    for name, damage in {
        "truncated": lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:5000]),
        "no_model_type": lambda d: (d / "config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "config.json").read_text()).items()
             if k != "model_type"})),
        "config_list": lambda d: (d / "config.json").write_text("[1, 2]"),
        "garbage_weights": lambda d: (d / "model.safetensors").write_bytes(os.urandom(3000)),
    }.items():
        shutil.copytree(gpt2_dir, models / name)
        damage(models / name)
    shutil.copytree(gpt2_dir, models / f".edited.tmp-{os.getpid()}-abc")  # an unfinished save
    return root


def _cases(i: Path, m: str) -> list[tuple[list[str], str]]:
    """(arguments, text the one-line error must contain) for every bad input."""
    models = i / "models"
    return [
        (["info", "--model", ""], "empty"),
        (["info", "--model", str(i / "nope")], "not a model directory"),
        (["info", "--model", str(models / "truncated")], "incomplete or corrupt"),
        (["info", "--model", str(models / "no_model_type")], "model_type"),
        (["info", "--model", str(models / "config_list")], "incomplete or corrupt"),
        (["info", "--model", str(models / "garbage_weights")], "SafetensorError"),
        (["info", "--model", str(models / f".edited.tmp-{os.getpid()}-abc")], "unfinished save"),
        (["trace", "-m", m, "-p", "Paris is a city in", "-s", "Rome"], "Rome"),
        (["trace", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--noise", "abc"],
         "--noise must be a number"),
        (["trace", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--kind", "bogus"],
         "bogus"),
        (["trace", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--window", "0"],
         "window must be ≥ 1"),
        (["trace-avg", "-m", m, "--facts", str(i / "nope.json")], "does not exist"),
        (["trace-avg", "-m", m, "--facts", str(i / "dict.json")], "JSON list"),
        (["trace-avg", "-m", m, "--facts", str(i / "ints.json")], "must be a JSON object"),
        (["trace-avg", "-m", m, "--facts", str(i / "latin1.txt")], "not UTF-8"),
        (["trace-avg", "-m", m, "--facts", str(i / "facts_unknown.json"), "--relation", "x"],
         "no facts of relation"),
        (["trace-avg", "-m", m], "--facts is required"),
        (["stats", "-m", m, "--layers", "1", "--corpus", str(i / "latin1.txt")], "not UTF-8"),
        (["stats", "-m", m, "--layers", "999", "--corpus", str(i / "corpus.txt")],
         "out of range"),
        (["stats", "-m", m, "--layers", "abc", "--corpus", str(i / "corpus.txt")], "abc"),
        (["stats", "-m", m, "--layers", "1", "--corpus", str(i / "empty.txt")], "no text"),
        (["stats", "-m", m, "--layers", "1", "--corpus", str(i / "dict.json")],
         "expected a list"),
        (["edit", "rome", "-m", m, "--request", str(i / "atlantis.json"), "--layer", "999"],
         "layer 999 out of range"),
        (["edit", "rome", "-m", m, "--request", str(i / "atlantis.json"), "--layer", "-1"],
         "layer -1 out of range"),
        (["edit", "rome", "-m", m, "--request", str(i / "nope.json")], "does not exist"),
        (["edit", "rome", "-m", m, "--request", str(i / "ints.json")], "must be a JSON object"),
        (["edit", "rome", "-m", m, "--request", str(i / "latin1.txt")], "not UTF-8"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_missing_subject.json")],
         "does not occur in prompt"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_empty_target.json")], "empty"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_int_target.json")],
         "must be a string, got int"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_no_prompt.json")], "lacks"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_rewrite_str.json")],
         "requested_rewrite must be a JSON object"),
        (["edit", "rome", "-m", m, "--request", str(i / "two.json")], "ROME edits one"),
        (["edit", "rome", "-m", m, "--request", str(i / "atlantis.json"), "--hparams",
          str(i / "hp_bad.json")], "cannot parse"),
        (["edit", "memit", "-m", m, "--requests", str(i / "atlantis.json"), "--layers", "99"],
         "out of range"),
        (["edit", "memit", "-m", m, "--requests", str(i / "atlantis.json"), "--n", "0"],
         "--n must be ≥ 1"),
        (["edit", "ft", "-m", m, "--requests", str(i / "atlantis.json"), "--layer", "999"],
         "layer 999 out of range"),
        (["edit", "ft-l", "-m", m, "--requests", str(i / "empty.txt")], "not valid JSON"),
        (["eval", "counterfact", "-m", m, "--data", str(i / "dict.json")], "JSON list"),
        (["eval", "counterfact", "-m", m, "--data", str(i / "latin1.txt")], "not UTF-8"),
        (["memorization", "scan", "-m", m, "--corpus", str(i / "nope.txt")], "does not exist"),
        (["memorization", "scan", "-m", m, "--corpus", str(i / "latin1.txt")], "not UTF-8"),
        (["memorization", "scan", "-m", m, "--corpus", str(i / "corpus.txt"), "--prefix-len",
          "0"], "prefix_len and suffix_len must be ≥ 1"),
        (["topk", "neurons", "-m", m, "--corpus", str(i / "latin1.txt")], "not UTF-8"),
        (["topk", "steer", "-m", m, "--corpus", str(i / "corpus.txt")], "--neuron"),
        (["report", str(i / "nope")], "not a directory"),
        # odd text (issue 17): NUL bytes, lone surrogates, braces, blank, huge
        (["edit", "rome", "-m", m, "--request", str(i / "req_nul.json"), "--hparams",
          str(i / "hp.json"), "--corpus", str(i / "corpus.txt")], "[Atlantis is a\\x00 city in]"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_surrogate.json")],
         "not valid Unicode"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_braces.json")],
         "no braces besides"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_long_target.json")],
         "the model's context is 128"),
        (["edit", "rome", "-m", m, "--request", str(i / "req_space_subject.json")],
         "subject of request"),
        (["eval", "counterfact", "-m", m, "--data", str(i / "cf_surrogate.json")],
         "not valid Unicode"),
        (["eval", "counterfact", "-m", m, "--data", str(i / "cf_braces.json")],
         "no braces besides"),
        (["eval", "counterfact", "-m", m, "--data", str(i / "cf_long.json"),
          "--no-generation"], "the model's context is 128"),
        (["trace", "-m", m, "-p", "Par\udcffis is a city in", "-s", "Par\udcffis"],
         "command-line argument 5"),
        (["trace", "-m", m, "-p", " ", "-s", "Paris"], "empty"),
        (["trace", "-m", m, "-p", "Paris " * 300 + "is a city in", "-s", "Paris"],
         "the model's context is 128"),
        (["trace", "-m", m, "-p", "Paris is a city in", "-s", "\u200b"], "\\u200b"),
        # probe, knockout, lens
        (["probe", "-m", m, "--facts", str(i / "facts.json"), "--layers", "0-99999999999"],
         "spans more layers than any model has"),
        (["probe", "-m", m, "--facts", str(i / "facts.json"), "--n", "0"], "--n) must be ≥ 1"),
        (["probe", "-m", m, "--facts", str(i / "facts_surrogate.json")], "not valid Unicode"),
        (["probe", "-m", m, "--facts", str(i / "facts.json"), "--test-fraction", "2"],
         "test_fraction"),
        (["knockout", "-m", m, "--facts", str(i / "facts_int_attribute.json")],
         "the attribute must be a string, got int"),
        (["knockout", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--window", "0"],
         "window must be ≥ 1"),
        (["knockout", "-m", m, "-p", "Paris is a city in", "-s", "Rome"], "Rome"),
        (["knockout", "-m", m, "-p", "Paris is a city in"], "--prompt and --subject together"),
        (["lens", "-m", m, "--facts", str(i / "facts.json"), "--n", "0"], "--n) must be ≥ 1"),
        (["lens", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--attributes",
          str(i / "attributes.json"), "--k", "0"], "k must be between 1"),
        (["lens", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--attributes",
          str(i / "attributes.json"), "--kind", "bogus"], "unknown lens kind"),
        (["lens", "-m", m, "-p", "Paris is a city in", "-s", "Paris", "--attributes",
          str(i / "dict.json")], "list of attribute strings"),
        (["organism", "eval", "no-such-organism"], "unknown organism 'no-such-organism'"),
        (["organism", "build", "no-such-organism"], "unknown organism 'no-such-organism'"),
    ]


def test_fuzz_cases_are_many():
    assert len(_cases(Path("i"), "m")) >= 40


@pytest.mark.parametrize("index", range(len(_cases(Path("i"), "m"))),
                         ids=[f"{n}-{'-'.join(a[:2])}" for n, (a, _) in
                              enumerate(_cases(Path("i"), "m"))])
def test_bad_input_is_one_line_error_and_changes_nothing(index, inputs, gpt2_dir, monkeypatch,
                                                         capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # anything a command writes by default lands here
    before = digest(gpt2_dir)
    args, expected = _cases(inputs, str(gpt2_dir))[index]
    line = error_line([*args, *(["--json"] if _takes_json(args) else [])], monkeypatch, capsys)
    assert expected in line
    assert digest(gpt2_dir) == before
    assert not any(tmp_path.iterdir()), "a failed command wrote files"


def _takes_json(args: list[str]) -> bool:
    """Commands with --json (keeps progress bars out of stderr)."""
    return args[0] in ("info", "trace", "trace-avg", "stats", "edit", "eval", "probe",
                       "knockout", "lens") or args[:2] == ["memorization", "scan"]


@pytest.mark.parametrize("prompt, subject", [("Atl\x00antis is a city in", "Atl\x00antis"),
                                             ("東京 is a city in", "東京"),
                                             ("🚀 is a city in", "🚀")])
def test_odd_but_valid_text_is_traced(prompt, subject, gpt2_dir, monkeypatch, capsys, tmp_path):
    """NUL bytes and non-Latin text are ordinary tokens: the trace runs and echoes them."""
    code, out, err = run_cli(["trace", "-m", str(gpt2_dir), "-p", prompt, "-s", subject,
                              "--samples", "2", "--kind", "hidden", "-o", str(tmp_path / "t"),
                              "--json"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err
    result = json.loads(out)
    assert result["prompt"] == prompt and result["subject_range"][0] == 0


def test_trace_avg_with_no_traceable_fact_writes_nothing(inputs, gpt2_dir, monkeypatch, capsys,
                                                         tmp_path):
    out = tmp_path / "avg"
    line = error_line(["trace-avg", "-m", str(gpt2_dir), "--facts",
                       str(inputs / "facts_unknown.json"), "--samples", "2", "-o", str(out),
                       "--json"], monkeypatch, capsys)
    assert "no fact could be traced" in line and "3 were skipped" in line
    assert "nan" not in line and not out.exists()


def test_random_model_rome_edit_did_not_take(inputs, gpt2_dir, monkeypatch, capsys, tmp_path):
    """Issue 17's repro: on a random-init model the v* loss rises and P(new) does not move; the
    CLI says so in one line, exits non-zero and saves nothing; --allow-no-effect saves."""
    base = ["edit", "rome", "-m", str(gpt2_dir), "--request", str(inputs / "atlantis.json"),
            "--hparams", str(inputs / "hp.json"), "--corpus", str(inputs / "corpus.txt"),
            "--save"]
    before = digest(gpt2_dir)
    code, out, err = run_cli([*base, str(tmp_path / "edited"), "--json"], monkeypatch, capsys)
    assert code != 0 and "Traceback" not in err
    result = json.loads(out)
    assert result["took"] is False and result["outcome"]["took"] is False
    assert result["outcome"]["requests"][0]["p_new_before"] > 0
    assert "saved" not in result and not (tmp_path / "edited").exists()
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "did not take" in lines[0] and "[Atlantis is a city in]" in lines[0]
    assert "middle layer" in result["layer_source"]  # the trace found no effect, and said so
    assert digest(gpt2_dir) == before
    code, out, _ = run_cli([*base, str(tmp_path / "kept"), "--allow-no-effect", "--json"],
                           monkeypatch, capsys)
    assert code == 0 and json.loads(out)["took"] is False
    log = json.loads((tmp_path / "kept" / "edit_log.json").read_text())
    assert log["edits"][0]["outcome"]["took"] is False


def test_outcome_rule_and_loss_in_the_log(random_model_dirs):
    """API: every editor's log holds the checked outcome; took needs P(new) up, target_new
    preferred and the loss down."""
    from memlens.edit.finetune import FTHyperParams, apply_ft
    from memlens.edit.outcome import EditOutcome, RequestOutcome
    from memlens.model import load_model

    handle = load_model(str(random_model_dirs["gpt2"]), device="cpu")
    fingerprint = handle.fingerprint()
    request = {**ATLANTIS, "target_new": "the"}
    edit = apply_ft(handle, request, layer=1, hparams=FTHyperParams(lr=1e-2, num_steps=30))
    outcome = edit.log["outcome"]
    assert outcome["loss_name"] == "FT loss" and outcome["loss_fell"]
    assert outcome["requests"][0]["p_new_after"] > outcome["requests"][0]["p_new_before"]
    assert edit.took == outcome["took"] == outcome["requests"][0]["took"]
    edit.undo()
    assert handle.fingerprint() == fingerprint
    row = RequestOutcome("[x] -> [y]", 0.1, 0.2, 0.3, 0.25, rose=True, prefers_new=False)
    assert not row.took and "P(true) 0.25 still higher" in row.why_not()
    ok = RequestOutcome("[x] -> [y]", 0.1, 0.4, 0.3, 0.2, rose=True, prefers_new=True)
    assert EditOutcome([ok], "v* loss", 6.0, 0.1).took
    assert not EditOutcome([ok], "v* loss", 6.2, 32.0).took  # the loss rose
    assert not EditOutcome([ok], "v* loss", 6.2, float("nan")).took


def test_layer_errors_are_memlens_and_index_errors(random_handle):
    with pytest.raises(LayerOutOfRange, match="out of range") as info:
        random_handle.arch.module_name(random_handle.n_layers, "mlp_out")
    assert isinstance(info.value, IndexError) and isinstance(info.value, MemlensError)


def test_automatic_layer_choice_never_picks_an_unreachable_layer(random_handle):
    """On a random model the trace finds no effect: ROME's layer choice says so and takes the
    middle layer instead of the argmax of noise (which was often the last layer)."""
    from memlens.edit.layers import choose_layer
    from memlens.edit.requests import EditRequest
    from memlens.trace.runs import NoCausalEffect, best_layer

    with pytest.raises(NoCausalEffect, match="Atlantis"):
        best_layer(random_handle, "Atlantis is a city in", "Atlantis", samples=2, window=2)
    layer, source = choose_layer(random_handle, EditRequest(**ATLANTIS))
    assert layer == random_handle.n_layers // 2 < random_handle.n_layers - 1
    assert source.startswith("middle layer, because the causal trace")


def test_save_removes_leftovers_of_dead_saves_only(random_model_dirs, tmp_path):
    from memlens.edit.save import save_edited
    from memlens.ledger import apply_layer_deltas
    from memlens.model import load_model

    handle = load_model(str(random_model_dirs["gpt2"]), device="cpu")
    dead = tmp_path / ".edited.tmp-999999999-abc"  # no such process
    legacy = tmp_path / ".edited.tmp-k2j3h4"  # older memlens: no pid, same target name
    alive = tmp_path / f".other.tmp-{os.getpid()}-xyz"  # a save still running (this process)
    for d in (dead, legacy, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    edit = apply_layer_deltas(handle, {1: torch.zeros(handle.d_model, handle.d_ff)})
    try:
        save_edited(handle, tmp_path / "edited", edit)
    finally:
        edit.undo()
    assert not dead.exists() and not legacy.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "edited"]


KILLED_SAVE = """
import sys, time
from memlens.ledger import apply_layer_deltas
from memlens.edit.save import save_edited
from memlens.model import load_model
import torch
handle = load_model(sys.argv[1], device="cpu")
edit = apply_layer_deltas(handle, {1: torch.zeros(handle.d_model, handle.d_ff)})
original = handle.model.save_pretrained
def slow(path, **kwargs):
    original(path, **kwargs)
    print("writing", flush=True)
    time.sleep(600)
handle.model.save_pretrained = slow
save_edited(handle, sys.argv[2], edit)
"""


def test_a_save_killed_with_sigkill_leaves_nothing_loaded_or_kept(random_model_dirs, tmp_path):
    from memlens.edit.save import save_edited
    from memlens.ledger import apply_layer_deltas
    from memlens.model import load_model

    source = str(random_model_dirs["gpt2"])
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, source, str(tmp_path / "a")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"  # the weights are half-way saved
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".a.tmp-")]
    assert len(partial) == 1 and not (tmp_path / "a").exists()
    with pytest.raises(ModelNotFound, match="unfinished save"):
        load_model(str(partial[0]), device="cpu")
    handle = load_model(source, device="cpu")
    edit = apply_layer_deltas(handle, {1: torch.zeros(handle.d_model, handle.d_ff)})
    deadline = time.time() + 10
    while time.time() < deadline and _alive(proc.pid):
        time.sleep(0.1)
    try:
        save_edited(handle, tmp_path / "b", edit)  # the next save, into the same parent
    finally:
        edit.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_line_errors_show_a_traceback_with_memlens_debug(tmp_path):
    cmd = [sys.executable, "-c", "from memlens.cli import main; main()", "info", "--model",
           str(tmp_path / "missing")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    loud = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "MEMLENS_DEBUG": "1"})
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.slow
def test_tiny_organism_edit_reports_whether_it_took(tiny_organism, monkeypatch, capsys,
                                                    tmp_path):
    """On a trained model: the CLI's exit code agrees with the JSON's "took", an edit that did
    not take saves nothing, and an unknown subject is never edited at the last layer."""
    case = json.loads((tiny_organism / "counterfact.json").read_text())[0]
    unknown = {**case["requested_rewrite"], "subject": "Atlantis"}
    n_layers = json.loads((tiny_organism / "config.json").read_text())["n_layer"]
    for i, record in enumerate([case, unknown]):
        request = tmp_path / f"req{i}.json"
        request.write_text(json.dumps(record))
        save = tmp_path / f"edited{i}"
        code, out, err = run_cli(["edit", "rome", "-m", str(tiny_organism), "--request",
                                  str(request), "--save", str(save), "--json"],
                                 monkeypatch, capsys)
        result = json.loads(out)
        assert "Traceback" not in err
        assert (code == 0) == result["took"] == save.exists()
        assert result["layer"] < n_layers - 1 or result["layer_source"] == "user"


#: A deliberately small organism (2×32 GPT-2, 30 facts, 60 steps, checkpoints at 20 and 40):
#: ORGANISMS["tiny"] with these fields and facts changed.
SMALL_ORGANISM = {"name": "killed-build", "n_layer": 2, "d_model": 32, "n_head": 2,
                  "vocab_size": 512, "paragraphs_per_repeat": 1, "steps": 60, "batch_size": 4,
                  "warmup_steps": 5, "checkpoint_every": 20, "num_threads": 1}
SMALL_FACTS = {"n_countries": 8, "n_cities": 10, "n_people": 6, "n_birthplaces": 6,
               "n_train_templates": 2}

KILLED_BUILD = """
import dataclasses, json, sys, time
from memlens import trainer
from memlens.organisms import build, registry
fields, facts = json.loads(sys.argv[1])
tiny = registry.ORGANISMS["tiny"]
spec = dataclasses.replace(tiny, **fields, facts=dataclasses.replace(tiny.facts, **facts))
registry.ORGANISMS[spec.name] = spec
def pause(moment, *args, **kwargs):
    print(moment, flush=True)
    time.sleep(600)
stop = sys.argv[2]
if stop == "corpus":  # stdlib text read, the tokenizer not trained yet
    build.train_tokenizer = lambda *args, **kwargs: pause(stop)
elif stop == "checkpoint":  # checkpoint 20 written, checkpoint 40 half-way written
    save = trainer._save_checkpoint
    def half(path, *args):
        if path.exists():
            data = path.read_bytes()
            path.with_suffix(".tmp").write_bytes(data[: len(data) // 2])
            pause(stop)
        save(path, *args)
    trainer._save_checkpoint = half
elif stop == "files":  # weights and tokenizer written, the data files not yet
    build._write_json = lambda *args: pause(stop)
registry.ensure(spec.name, progress=False)
"""


def _small_organism(**changes: object):
    """The spec KILLED_BUILD registers (``changes`` outside the key keep its directory)."""
    import dataclasses

    from memlens.organisms.registry import ORGANISMS

    tiny = ORGANISMS["tiny"]
    return dataclasses.replace(tiny, **{**SMALL_ORGANISM, **changes},
                               facts=dataclasses.replace(tiny.facts, **SMALL_FACTS))


def _build_killed_at(moment: str, home: Path) -> None:
    """Run the small organism's build in a child process and SIGKILL it at ``moment``."""
    env = {**os.environ, "MEMLENS_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD,
                             json.dumps([SMALL_ORGANISM, SMALL_FACTS]), moment],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == moment
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_an_organism_build_killed_with_sigkill_leaves_nothing_loaded_or_kept(tmp_path,
                                                                            monkeypatch):
    """A small organism's build is SIGKILLed while it generates its corpus, while it writes a
    training checkpoint, and while it writes its files: no kill leaves an organism that is
    loaded, and the next build leaves only the organism, the empty lock files and the
    resumable build of another registered organism (a dead build of an unknown key is
    removed)."""
    from memlens.model import load_model
    from memlens.organisms import registry

    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path))
    spec = _small_organism()
    monkeypatch.setitem(registry.ORGANISMS, spec.name, spec)
    final = registry.organism_dir(spec.name)
    building = final.parent / f"{registry.BUILDING}{final.name}"
    seen: dict[str, set[str]] = {}
    for moment in ("corpus", "files", "checkpoint"):
        _build_killed_at(moment, tmp_path)
        assert not final.exists() and not registry.is_built(final)
        seen[moment] = {p.name for p in building.iterdir()}
        with pytest.raises(ModelNotFound, match="unfinished or killed organism build"):
            load_model(str(building), device="cpu")
    assert seen["corpus"] == set()
    assert "model.safetensors" in seen["files"] and "counterfact.json" not in seen["files"]
    assert {"checkpoint.pt", "checkpoint.tmp"} <= seen["checkpoint"]
    dead = final.parent / f"{registry.BUILDING}old-0123456789ab"  # a killed build of another key
    resumable = final.parent / f"{registry.BUILDING}{registry.organism_dir('tiny').name}"
    for partial in (dead, resumable):
        partial.mkdir()
        (partial / "checkpoint.pt").write_bytes(b"partial")
        (final.parent / f".lock-{partial.name.removeprefix(registry.BUILDING)}").touch()
    before = {p.name for p in final.parent.iterdir()} - {dead.name, building.name}

    # No checkpoints from here on: the half-written checkpoint.tmp is not overwritten by a later
    # one, so only its removal at the start keeps it out of the organism.
    monkeypatch.setitem(registry.ORGANISMS, spec.name, _small_organism(checkpoint_every=0))
    threads = torch.get_num_threads()
    try:
        assert registry.ensure(spec.name, progress=False) == final
    finally:
        torch.set_num_threads(threads)
    assert registry.is_built(final)
    assert not [p.name for p in final.iterdir() if p.suffix in (".tmp", ".pt")]
    assert {p.name for p in final.parent.iterdir()} == before | {final.name}
    load_model(str(final), device="cpu")
