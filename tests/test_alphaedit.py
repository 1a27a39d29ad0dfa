"""AlphaEdit (memlens.edit.alphaedit): the null-space projection, the solve with the keys of
earlier edits, and the undo guarantees, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memlens.edit import EditRequest
from memlens.edit.alphaedit import (
    AlphaEditHyperParams,
    AlphaEditState,
    alphaedit_layer_delta,
    apply_alphaedit,
    nullspace_projection,
)
from memlens.edit.hparams import InvalidHyperParams
from memlens.scoring import score_targets
from memlens.stats import layer_stats

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")

REQUESTS = [EditRequest("{} is a city in", "Toulouse", "Japan"),
            EditRequest("{} plays the", "Miles Davis", "Paris"),
            EditRequest("The capital of {} is", "Japan", "Apple"),
            EditRequest("{} was founded by", "Apple", "Steve Jobs")]
#: as tests/test_memit.py's RANDOM_HP (random models: last token, no decay, free clamp); the
#: threshold is set per model from C's eigenvalues (the half of C's spectrum with least energy)
RANDOM_HP = AlphaEditHyperParams(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=1e3,
                                 context_templates=((4, 2),), mom2_n_samples=200, l2=1e-3)


@pytest.fixture(scope="module")
def llama(random_model_dirs):
    from memlens.model import load_model

    return load_model(str(random_model_dirs["llama"]), device="cpu")


def state_of(handle):
    return {k: v.clone() for k, v in handle.model.state_dict().items()}


def assert_same_state(handle, before):
    after = handle.model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def median_threshold(handle, corpus, layers):
    """A threshold that keeps the lower half of every layer's spectrum of C."""
    stats = layer_stats(handle, layers, corpus=str(corpus), n_samples=200, progress=False)
    return float(max(torch.linalg.eigvalsh(s.mom2).median() for s in stats.values())), stats


def delta_of(handle, edit, layer):
    name = next(n for n in edit.originals if f".{layer}." in n)
    W0 = edit.originals[name].double()
    W = handle.arch.get_edit_weight(handle.model, layer).double()
    return W - (W0.T if handle.arch.spec.mlp_out_transposed else W0)  # (d_model, d_ff)


def test_projection_keeps_the_small_eigendirections():
    g = torch.Generator().manual_seed(0)
    K0 = torch.randn(16, 8, generator=g, dtype=torch.float64)  # 8 keys span 8 of 16 dims
    P, dim = nullspace_projection(K0 @ K0.T / 8, 1e-8)
    assert dim == 8
    torch.testing.assert_close(P @ P, P)  # a projection
    assert (P @ K0).norm() < 1e-10 * K0.norm()


def test_layer_delta_annihilates_preserved_keys_and_reaches_new_ones():
    g = torch.Generator().manual_seed(1)
    K0 = torch.randn(32, 12, generator=g, dtype=torch.float64)
    P, _ = nullspace_projection(K0 @ K0.T / 12, 1e-8)
    K1 = torch.randn(32, 3, generator=g, dtype=torch.float64)
    R = torch.randn(8, 3, generator=g, dtype=torch.float64)
    delta = alphaedit_layer_delta(K1, R, P, torch.zeros(32, 32, dtype=torch.float64), 1e-6, 0)
    assert (delta @ K0).norm() < 1e-8 * delta.norm() * K0.norm()
    torch.testing.assert_close(delta @ K1, R, atol=1e-4, rtol=1e-4)  # keys span ⟂ K0 reached


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_alphaedit_spares_preserved_keys_moves_targets_and_undoes(model, request, corpus):
    handle = request.getfixturevalue(model)
    before = state_of(handle)
    threshold, stats = median_threshold(handle, corpus, [1, 2])
    hp = RANDOM_HP.replace(nullspace_threshold=threshold)
    prompts = [r.text for r in REQUESTS]
    nll_before = [s.nll for s in score_targets(handle, prompts, [r.target_new for r in REQUESTS])]
    edit = apply_alphaedit(handle, REQUESTS, layers=[1, 2], hparams=hp, corpus=str(corpus),
                           progress=False)
    nll_after = [s.nll for s in score_targets(handle, prompts, [r.target_new for r in REQUESTS])]
    assert sum(nll_after) < sum(nll_before)
    assert edit.log["method"] == "alphaedit" and edit.layers == [1, 2]
    assert 0 < edit.log["nullspace"]["1"]["dim"] < edit.log["nullspace"]["1"]["d_ff"]
    for layer in (1, 2):
        C = stats[layer].mom2.double()
        delta = delta_of(handle, edit, layer)
        eigenvalues, U = torch.linalg.eigh(C)
        K0 = U[:, eigenvalues >= threshold] * eigenvalues[eigenvalues >= threshold].sqrt()
        # the preserved subspace (C's large eigendirections) is annihilated ...
        assert (delta @ K0).norm() < 1e-6 * delta.norm() * K0.norm()
        # ... so the corpus keys' mean output change E‖ΔW k‖² = tr(ΔW C ΔWᵀ) is below
        # threshold·‖ΔW‖², whatever the size of the update
        assert float((delta @ C @ delta.T).trace()) <= threshold * float(delta.norm()) ** 2 \
            * (1 + 1e-6)
    json.dumps(edit.to_dict())
    edit.undo()
    assert_same_state(handle, before)


def test_sequential_calls_share_keys_and_undo_removes_them(gpt2, corpus):
    before = state_of(gpt2)
    threshold, _ = median_threshold(gpt2, corpus, [1, 2])
    hp = RANDOM_HP.replace(nullspace_threshold=threshold)
    state = AlphaEditState()
    first = apply_alphaedit(gpt2, REQUESTS[:2], layers=[1, 2], hparams=hp, corpus=str(corpus),
                            state=state, progress=False)
    second = apply_alphaedit(gpt2, REQUESTS[2:], layers=[1, 2], hparams=hp, corpus=str(corpus),
                             state=state, check_current=False, progress=False)
    assert first.log["earlier_edits"] == 0 and second.log["earlier_edits"] == 1
    assert state.n_edits(gpt2) == 2
    assert state.preserved(gpt2, 1, 128).trace() > 0
    second.undo()
    assert state.n_edits(gpt2) == 1
    first.undo()
    assert state.n_edits(gpt2) == 0 and state.preserved(gpt2, 1, 128).abs().max() == 0
    assert_same_state(gpt2, before)
    batched = apply_alphaedit(gpt2, REQUESTS, layers=[1, 2], hparams=hp.replace(batch_size=2),
                              corpus=str(corpus), progress=False)
    assert batched.log["z"]["batches"] == 2
    batched.undo()
    assert_same_state(gpt2, before)


def test_hparams_and_empty_null_space_fail_before_any_weight_changes(gpt2, corpus):
    with pytest.raises(InvalidHyperParams, match="mom2_adjustment"):
        RANDOM_HP.replace(mom2_adjustment=False)
    before = state_of(gpt2)
    with pytest.raises(Exception, match="nullspace_threshold"):
        apply_alphaedit(gpt2, REQUESTS, layers=[1], hparams=RANDOM_HP.replace(
            nullspace_threshold=1e-30), corpus=str(corpus), progress=False)
    assert_same_state(gpt2, before)


def test_registry_and_cli_run_alphaedit(gpt2, random_model_dirs, corpus, tmp_path):
    from memlens.cli import app
    from memlens.edit.editors import get_editor

    before = state_of(gpt2)
    threshold, _ = median_threshold(gpt2, corpus, [1, 2])
    hp = RANDOM_HP.replace(nullspace_threshold=threshold)
    editor = get_editor("alphaedit")
    plan = editor.prepare(gpt2, REQUESTS, layers=[1, 2], hparams=hp, corpus=str(corpus))
    edits, extra = editor.apply(gpt2, REQUESTS[:2], plan)
    edits2, extra2 = editor.apply(gpt2, REQUESTS[2:], plan, check_current=False)
    assert extra["earlier_edits"] == 0 and extra2["earlier_edits"] == 1
    for e in reversed(edits + edits2):
        e.undo()
    assert_same_state(gpt2, before)

    requests = tmp_path / "req.json"
    requests.write_text(json.dumps([r.to_dict() for r in REQUESTS]))
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps({k: v for k, v in hp.to_dict().items() if k != "layers"}))
    out = CliRunner().invoke(app, ["edit", "alphaedit", "--model", str(random_model_dirs["gpt2"]),
                                   "--requests", str(requests), "--layers", "1-2", "--hparams",
                                   str(hp_file), "--corpus", str(corpus), "--allow-no-effect",
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert '"nullspace"' in out.output


# ── sequential editing (memlens.studies.sequential) ─────────────────────────


def _counterfact(handle, path):
    """6 cases: 4 to edit (2 rounds of 2), 2 held out whose 'true' object is the random
    model's own greedy answer (so that it knows them before any edit)."""
    from memlens.edit.requests import greedy_answer

    subjects = ["Toulouse", "Paris", "Apple", "Miles Davis", "Steve Jobs", "France"]
    records = []
    for i, s in enumerate(subjects):
        true = "France" if i < 4 else handle.tokenizer.decode(
            greedy_answer(handle, f"{s} is a city in", 1))
        records.append({"case_id": i, "requested_rewrite": {
            "prompt": "{} is a city in", "subject": s, "target_new": {"str": "Japan"},
            "target_true": {"str": true}},
            "paraphrase_prompts": [f"The capital. {s} is in"],
            "neighborhood_prompts": ["Tokyo is a city in"], "generation_prompts": [f"{s} is"]})
    path.write_text(json.dumps(records))
    return path


def test_sequential_rounds_write_json_resume_and_undo_bit_exact(gpt2, corpus, tmp_path,
                                                                 monkeypatch):
    import memlens.studies.sequential as sequential
    from memlens.edit.memit import MEMITHyperParams
    from memlens.evaluate import load_counterfact

    before = state_of(gpt2)
    threshold, _ = median_threshold(gpt2, corpus, [1, 2])
    cases = load_counterfact(_counterfact(gpt2, tmp_path / "cf.json"))
    memit_hp = MEMITHyperParams(**{k: v for k, v in RANDOM_HP.to_dict().items()
                                   if k not in ("nullspace_threshold", "l2", "mom2_update_weight")},
                                mom2_update_weight=10.0)
    kwargs = dict(batch_size=2, rounds=2, layers=[1, 2], unrelated=2, corpus=str(corpus),
                  hparams={"memit": memit_hp,
                           "alphaedit": RANDOM_HP.replace(nullspace_threshold=threshold)},
                  progress=False)
    full = sequential.sequential_edits(gpt2, cases, methods=["memit", "alphaedit"],
                                       out_dir=tmp_path / "a", **kwargs)
    assert [(p.method, p.round, p.n_edits) for p in full.points] == [
        (m, r, 2 * r) for m in ("memit", "alphaedit") for r in (1, 2)]
    assert full.settings["unrelated_known"] >= 1
    assert all(0 <= p.unrelated <= 1 and 0 <= p.ES <= 1 for p in full.points)
    assert full.points[3].extra["earlier_edits"] == 1  # round 2 saw round 1's keys
    assert (tmp_path / "a" / "sequential.png").stat().st_size > 0
    assert_same_state(gpt2, before)

    real, calls = sequential._quality, []

    def interrupted(*args, **kw):  # the second round's measurement is interrupted
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(sequential, "_quality", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sequential.sequential_edits(gpt2, cases, methods=["alphaedit"],
                                    out_dir=tmp_path / "b", **kwargs)
    assert_same_state(gpt2, before)
    saved = json.loads((tmp_path / "b" / "sequential.json").read_text())
    assert [p["round"] for p in saved["points"]] == [1]
    monkeypatch.setattr(sequential, "_quality", real)
    resumed = sequential.sequential_edits(gpt2, cases, methods=["alphaedit"],
                                          out_dir=tmp_path / "b", **kwargs)
    assert [p.round for p in resumed.points] == [1, 2]
    for got, want in zip(resumed.points, full.points[2:], strict=True):
        for metric in ("ES", "PS", "NS", "unrelated"):
            assert getattr(got, metric) == pytest.approx(getattr(want, metric), abs=1e-6)
    assert_same_state(gpt2, before)


def test_cli_bench_edits_sequential(gpt2, random_model_dirs, corpus, tmp_path):
    from memlens.cli import app

    data = _counterfact(gpt2, tmp_path / "cf.json")
    out = CliRunner().invoke(app, ["bench-edits", "--sequential", "--model",
                                   str(random_model_dirs["gpt2"]), "--data", str(data),
                                   "--methods", "ft-l", "--batch-size", "2", "--rounds", "2",
                                   "--unrelated", "2", "--ge-cases", "0", "--layer", "2",
                                   "--corpus", str(corpus), "--out", str(tmp_path / "seq")])
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "seq" / "sequential.json").read_text())
    assert [p["n_edits"] for p in data["points"]] == [2, 4]
    assert (tmp_path / "seq" / "sequential.png").is_file()
