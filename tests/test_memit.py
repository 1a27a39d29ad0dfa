"""MEMIT, FT/FT-L and the scaling curve: batched z equals one-at-a-time z, a batch of one is a
rank-one ROME-like insertion, bit-exact undo (also after a failure mid-way), the L∞ bound of
FT-L, bench-edits end to end, the CLI, and MEMIT on the `tiny` organism."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memlens.edit import EditRequest
from memlens.edit.finetune import FTHyperParams, apply_ft, apply_ft_l
from memlens.edit.keys import fact_token_reads
from memlens.edit.layers import middle_band
from memlens.edit.memit import MEMITHyperParams, apply_memit, memit_layer_delta
from memlens.edit.optimize import DeltaObjective, optimize_deltas
from memlens.edit.requests import InvalidRequest, greedy_answer
from memlens.errors import MemlensError, NumericalError, SubjectNotFound
from memlens.tokens import answer_ids

REQUESTS = [EditRequest("{} is a city in", "Toulouse", "Japan"),
            EditRequest("{} plays the", "Miles Davis", "Paris"),
            EditRequest("The capital of {} is", "Japan", "Apple"),
            EditRequest("{} was founded by", "Apple", "Steve Jobs")]
#: Random models have near-uniform logits and diffuse attention: edit at the last token,
#: without the norm penalty, so that a few steps move the target at all.
RANDOM_HP = MEMITHyperParams(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=1e3,
                             context_templates=((4, 2),), mom2_update_weight=10.0,
                             mom2_n_samples=200)


pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")


@pytest.fixture(scope="module")
def llama(random_model_dirs):
    from memlens.model import load_model

    return load_model(str(random_model_dirs["llama"]), device="cpu")


def state(handle):
    return {k: v.clone() for k, v in handle.model.state_dict().items()}


def assert_same_state(handle, before):
    after = handle.model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def targets_of(handle, requests):
    return [answer_ids(handle.tokenizer, r.text, r.target_new) for r in requests]


# ── the batched z optimisation ──────────────────────────────────────────────


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_batched_z_equals_z_optimised_one_at_a_time(model, request):
    handle = request.getfixturevalue(model)
    requests = REQUESTS * 2
    point = "blocks.2.hook_resid_post"
    h0 = fact_token_reads(handle, requests, ["{}"], "last", {point: "bare"})[point]
    # a stop loss between the facts' losses, so that some facts freeze early and some do not
    objective = DeltaObjective(fact_token="last", weight_decay=0.0, clamp_norm_factor=50.0,
                               steps=8, stop_loss=5.6)
    templates = ["{}", "The capital. {}"]
    batched = optimize_deltas(handle, point, requests, targets_of(handle, requests), templates,
                              h0, objective)
    alone = optimize_deltas(handle, point, requests, targets_of(handle, requests), templates,
                            h0, objective, max_batch_tokens=0)
    assert batched.steps == alone.steps
    torch.testing.assert_close(batched.delta, alone.delta, atol=1e-4, rtol=1e-3)
    assert batched.delta.abs().max() > 0
    assert batched.summary()["loss_last"] <= batched.summary()["loss_first"]


def test_grouped_requests_share_one_delta_that_serves_every_target(gpt2):
    """MEMIT-Merge: requests about one subject get one δ, optimised for all their targets;
    singleton groups are the ungrouped optimisation, and other groups are unaffected."""
    handle = gpt2
    requests = [REQUESTS[0], REQUESTS[1], EditRequest("{} is famous for", "Toulouse", "Apple")]
    point = "blocks.2.hook_resid_post"
    h0 = fact_token_reads(handle, requests, ["{}"], "last", {point: "bare"})[point]
    objective = DeltaObjective(fact_token="subject_last", weight_decay=0.0,
                               clamp_norm_factor=50.0, steps=6)
    targets = targets_of(handle, requests)
    plain = optimize_deltas(handle, point, requests, targets, ["{}"], h0, objective)
    singles = optimize_deltas(handle, point, requests, targets, ["{}"], h0, objective,
                              groups=[[0], [1], [2]])
    assert torch.equal(plain.delta, singles.delta)
    merged = optimize_deltas(handle, point, requests, targets, ["{}"], h0[[0, 1]], objective,
                             groups=[[0, 2], [1]])
    assert merged.delta.shape == (2, h0.shape[1])
    torch.testing.assert_close(merged.delta[1], plain.delta[1], atol=1e-4, rtol=1e-3)
    assert merged.prob_after[0] > merged.prob_before[0]
    with pytest.raises(MemlensError, match="exactly once"):
        optimize_deltas(handle, point, requests, targets, ["{}"], h0[[0, 1]], objective,
                        groups=[[0, 1], [1]])


def test_memit_merges_requests_about_one_subject(gpt2, corpus):
    requests = [REQUESTS[0], EditRequest("{} is famous for", "Toulouse", "Apple"), REQUESTS[1]]
    for merge, n_z in ((True, 2), (False, 3)):
        hp = RANDOM_HP.replace(merge_same_subject=merge, fact_token="subject_last",
                               v_num_grad_steps=3)
        edit = apply_memit(gpt2, requests, layers=[1, 2], hparams=hp, corpus=str(corpus),
                           check_current=False, progress=False)
        edit.undo(force=True)
        assert edit.log["z"]["n"] == n_z


@pytest.mark.parametrize("point", ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out",
                                   "blocks.3.hook_resid_post"])  # the last: every block skipped
def test_suffix_only_passes_equal_whole_model_passes(random_handle, point):
    """Skipping the blocks below the point and the positions before the fact token (cached)
    changes nothing: same δ, same losses, same steps, on every architecture, with rows whose
    fact tokens sit at different positions (0 included).

    At the last block's output δ at the subject reaches no target token: the NLL's gradient is
    0 and the KL's is 0 up to rounding, which Adam's normalisation would blow up to ±lr steps,
    so that point edits the last token, where δ moves the targets."""
    handle = random_handle
    requests = REQUESTS + [EditRequest("{} is", "Japan", "Apple")]
    fact_token = "last" if point == "blocks.3.hook_resid_post" else "subject_last"
    h0 = fact_token_reads(handle, requests, ["{}"], fact_token, {point: "bare"})[point]
    objective = DeltaObjective(weight_decay=0.0, clamp_norm_factor=50.0, steps=4, lr=0.5,
                               fact_token=fact_token)
    templates = ["{}", "The capital. {}", "Miles Davis plays the piano. {}"]
    targets = targets_of(handle, requests)
    fast = optimize_deltas(handle, point, requests, targets, templates, h0, objective)
    whole = optimize_deltas(handle, point, requests, targets, templates, h0, objective,
                            suffix_only=False)
    assert fast.steps == whole.steps
    torch.testing.assert_close(fast.delta, whole.delta, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(fast.loss_last), torch.tensor(whole.loss_last),
                               atol=1e-4, rtol=1e-4)
    assert fast.delta.abs().max() > 0


def test_delta_respects_the_clamp(gpt2):
    point = "blocks.1.hook_resid_post"
    h0 = fact_token_reads(gpt2, REQUESTS, ["{}"], "last", {point: "bare"})[point]
    result = optimize_deltas(gpt2, point, REQUESTS, targets_of(gpt2, REQUESTS), ["{}"], h0,
                             DeltaObjective(fact_token="last", clamp_norm_factor=0.1,
                                            weight_decay=0.0, steps=5, lr=5.0))
    assert (result.delta.norm(dim=1) <= 0.1 * h0.norm(dim=1) * (1 + 1e-5)).all()


def test_keys_are_averaged_over_templates(gpt2):
    point = "blocks.1.mlp.hook_post"
    templates = ["{}", "The capital. {}", "Paris is a. {}"]
    mean = fact_token_reads(gpt2, REQUESTS, templates, "subject_last", {point: "mean"})[point]
    from memlens.edit.compute import compute_k_star

    for i, request in enumerate(REQUESTS):
        torch.testing.assert_close(
            mean[i], compute_k_star(gpt2, request, 1, templates, "subject_last").k_star,
            atol=1e-5, rtol=1e-4)


# ── MEMIT ────────────────────────────────────────────────────────────────────


def test_layer_delta_of_one_fact_is_the_rank_one_insertion():
    """Sherman–Morrison: r kᵀ(λC + k kᵀ)⁻¹ = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), ROME's direction C⁻¹k;
    as λ → 0 it inserts (k, W k + r) exactly."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    C = A @ A.T / 16 + 0.1 * torch.eye(16, dtype=torch.float64)
    k = torch.randn(16, 1, generator=gen, dtype=torch.float64)
    r = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    u = torch.linalg.solve(C, k)
    for lam in (0.5, 20000.0):
        expected = r @ u.T / (lam + float(k.T @ u))
        torch.testing.assert_close(memit_layer_delta(k, r, C, lam, 0), expected)
    torch.testing.assert_close(memit_layer_delta(k, r, C, 1e-9, 0) @ k, r, atol=1e-6, rtol=1e-6)
    kept, spent = C.clone(), C.clone()
    assert torch.equal(memit_layer_delta(k, r, spent, 0.5, 0, overwrite_c=True),
                       memit_layer_delta(k, r, kept, 0.5, 0))
    assert torch.equal(kept, C) and not torch.equal(spent, C)  # only the disposable C is used


def test_layer_delta_rejects_nan():
    K = torch.ones(4, 2)
    with pytest.raises(NumericalError, match="no weights were changed"):
        memit_layer_delta(K, torch.full((3, 2), float("nan")), None, 1.0, 0)


def test_memit_batch_of_one_is_a_rank_one_edit_that_reaches_z(gpt2, corpus):
    before = state(gpt2)
    hp = RANDOM_HP.replace(context_templates=(), mom2_update_weight=1e-6)
    edit = apply_memit(gpt2, REQUESTS[:1], layers=[2], hparams=hp, corpus=str(corpus),
                       progress=False)
    W = gpt2.arch.get_edit_weight(gpt2.model, 2).double()
    W0 = edit.originals["transformer.h.2.mlp.c_proj.weight"].double().T
    s = torch.linalg.svdvals(W - W0)
    assert s[1] < 1e-4 * s[0]  # rank one
    assert edit.log["z"]["prob_after"] > edit.log["z"]["prob_before"]
    # λ ≈ 0 and the bare template only: the top layer now outputs z = h + δ at the fact token
    edit.undo()
    point = "blocks.2.hook_resid_post"
    h0 = fact_token_reads(gpt2, REQUESTS[:1], ["{}"], "last", {point: "bare"})[point]
    z = optimize_deltas(gpt2, point, REQUESTS[:1], targets_of(gpt2, REQUESTS[:1]), ["{}"], h0,
                        DeltaObjective.from_hparams(hp)).target
    edit = apply_memit(gpt2, REQUESTS[:1], layers=[2], hparams=hp, corpus=str(corpus),
                       progress=False)
    reached = fact_token_reads(gpt2, REQUESTS[:1], ["{}"], "last", {point: "bare"})[point]
    torch.testing.assert_close(reached, z, atol=1e-3, rtol=1e-3)
    edit.undo()
    assert_same_state(gpt2, before)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_memit_moves_targets_and_undo_is_bit_exact(model, request, corpus):
    handle = request.getfixturevalue(model)
    before = state(handle)
    prompts = [r.text for r in REQUESTS]
    from memlens.scoring import score_targets

    nll_before = [s.nll for s in score_targets(handle, prompts, [r.target_new for r in REQUESTS])]
    edit = apply_memit(handle, REQUESTS, layers=[1, 2], hparams=RANDOM_HP, corpus=str(corpus),
                       progress=False)
    nll_after = [s.nll for s in score_targets(handle, prompts, [r.target_new for r in REQUESTS])]
    assert sum(nll_after) < sum(nll_before)
    assert edit.layers == [1, 2] and set(edit.delta_norms) == {1, 2}
    assert edit.log["method"] == "memit" and edit.log["n_requests"] == 4
    json.dumps(edit.to_dict())
    edit.undo()
    assert_same_state(handle, before)


def test_memit_reading_each_c_from_the_cache_equals_holding_them(gpt2, corpus):
    from memlens.stats import StatsFiles, layer_stats

    hp = RANDOM_HP
    held = layer_stats(gpt2, [1, 2], corpus=str(corpus), n_samples=hp.mom2_n_samples,
                       max_len=hp.mom2_max_len, progress=False)
    files = layer_stats(gpt2, [1, 2], corpus=str(corpus), n_samples=hp.mom2_n_samples,
                        max_len=hp.mom2_max_len, progress=False, max_pass_bytes=1)
    assert isinstance(held, dict) and isinstance(files, StatsFiles)
    weights = []
    for stats in (held, files):
        edit = apply_memit(gpt2, REQUESTS, layers=[1, 2], hparams=hp, stats=stats,
                           progress=False)
        weights.append([gpt2.arch.get_edit_weight(gpt2.model, layer).clone() for layer in (1, 2)])
        edit.undo()
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert torch.equal(held[1].mom2, files[1].mom2)  # the held C was not overwritten


def test_memit_sequential_batches_and_undo(gpt2, corpus):
    before = state(gpt2)
    edit = apply_memit(gpt2, REQUESTS, layers=[1, 2], hparams=RANDOM_HP.replace(batch_size=2),
                       corpus=str(corpus), progress=False)
    assert edit.log["z"]["batches"] == 2 and len(edit.log["layer_updates"]) == 4
    edit.undo()
    assert_same_state(gpt2, before)


def test_failure_at_a_later_layer_restores_the_earlier_ones(gpt2, corpus, monkeypatch):
    import memlens.edit.memit as memit

    before = state(gpt2)
    real = memit.memit_layer_delta

    def fail_second(K, resid, C, lam, layer, **kwargs):
        if layer == 2:
            raise NumericalError("injected")
        return real(K, resid, C, lam, layer, **kwargs)

    monkeypatch.setattr(memit, "memit_layer_delta", fail_second)
    with pytest.raises(NumericalError, match="injected"):
        apply_memit(gpt2, REQUESTS, layers=[1, 2], hparams=RANDOM_HP, corpus=str(corpus),
                    progress=False)
    assert_same_state(gpt2, before)


def test_bad_requests_fail_before_any_weight_changes(gpt2, corpus):
    before = state(gpt2)
    with pytest.raises(SubjectNotFound, match="Toulouse"):
        apply_memit(gpt2, [REQUESTS[1], {"prompt": "Paris is nice", "subject": "Toulouse",
                                         "target_new": "x"}],
                    layers=[1], hparams=RANDOM_HP, corpus=str(corpus), progress=False)
    current = gpt2.tokenizer.decode(greedy_answer(gpt2, REQUESTS[0].text, 1))
    same = EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, current)
    with pytest.raises(InvalidRequest, match="already answers"):
        apply_memit(gpt2, [same], layers=[1], hparams=RANDOM_HP, corpus=str(corpus),
                    progress=False)
    assert_same_state(gpt2, before)
    edit = apply_memit(gpt2, [same, REQUESTS[1]], layers=[1], hparams=RANDOM_HP,
                       corpus=str(corpus), skip_invalid=True, progress=False)
    assert edit.log["n_requests"] == 1 and edit.log["skipped"][0]["index"] == 0
    edit.undo()
    assert_same_state(gpt2, before)


def test_middle_band():
    assert middle_band(48) == list(range(12, 18))
    assert middle_band(4) == [1, 2]
    assert middle_band(1) == [0]
    assert all(max(middle_band(n)) <= n - 2 for n in range(2, 60))  # z needs a later layer


def test_choose_layers_ends_before_the_last_layer(random_handle):
    from memlens.edit.layers import choose_layers
    from memlens.edit.requests import EditRequest

    layers, how = choose_layers(random_handle, [EditRequest("{} is a city in", "Toulouse",
                                                            "Japan")])
    assert layers and max(layers) <= random_handle.n_layers - 2, (layers, how)


# ── FT / FT-L ────────────────────────────────────────────────────────────────


def test_ft_l_respects_its_linf_bound_and_ft_does_not_need_to(gpt2):
    before = state(gpt2)
    name = "transformer.h.2.mlp.c_proj.weight"
    edit = apply_ft_l(gpt2, REQUESTS, layer=2, hparams=FTHyperParams(norm_constraint=1e-3,
                                                                     lr=1e-2, num_steps=5))
    change = (gpt2.model.state_dict()[name].double() - before[name].double()).abs().max()
    assert 0 < change <= 1e-3 + 1e-6 and edit.log["method"] == "ft-l"
    edit.undo()
    assert_same_state(gpt2, before)
    edit = apply_ft(gpt2, REQUESTS, layer=2, hparams=FTHyperParams(lr=1e-2, num_steps=5))
    assert edit.log["max_abs_change"] > 1e-3 and edit.log["loss_last"] < edit.log["loss_first"]
    edit.undo()
    assert_same_state(gpt2, before)


# ── bench-edits and the CLI ──────────────────────────────────────────────────


def _counterfact(path, n=4):
    subjects = ["Toulouse", "Paris", "Apple", "Miles Davis", "Steve Jobs", "France"][:n]
    records = [{"case_id": i, "requested_rewrite": {
        "prompt": "{} is a city in", "subject": s, "target_new": {"str": "Japan"},
        "target_true": {"str": "France"}},
        "paraphrase_prompts": [f"The capital. {s} is in"],
        "neighborhood_prompts": ["Tokyo is a city in"], "generation_prompts": [f"{s} is"]}
        for i, s in enumerate(subjects)]
    path.write_text(json.dumps(records))
    return path


def test_bench_edits_writes_json_plot_and_resumes(gpt2, corpus, tmp_path):
    from memlens.edit.hparams import ROMEHyperParams
    from memlens.evaluate import load_counterfact
    from memlens.studies.scaling import bench_edits

    before = state(gpt2)
    cases = load_counterfact(_counterfact(tmp_path / "cf.json"))
    kwargs = dict(layers=[1, 2], layer=2,
                  hparams={"memit": RANDOM_HP,
                           "rome": ROMEHyperParams(fact_token="last", context_templates=((4, 2),),
                                                   mom2_n_samples=200)},
                  corpus=str(corpus), ge_cases=2, max_new_tokens=5, out_dir=tmp_path / "b",
                  progress=False)
    result = bench_edits(gpt2, cases, [1, 3], **kwargs)
    assert [(p.method, p.n) for p in result.points] == [
        (m, n) for m in ("memit", "rome", "ft-l") for n in (1, 3)]
    assert all(0 <= p.Score <= 1 and p.seconds >= 0 for p in result.points)
    data = json.loads((tmp_path / "b" / "scaling.json").read_text())
    assert len(data["points"]) == 6 and (tmp_path / "b" / "scaling.png").stat().st_size > 0
    assert_same_state(gpt2, before)
    lines = (tmp_path / "b" / "points.jsonl").read_text().count("\n")
    again = bench_edits(gpt2, cases, [1, 3], **kwargs)  # every point read back, none redone
    assert (tmp_path / "b" / "points.jsonl").read_text().count("\n") == lines
    assert again.to_dict()["points"] == result.to_dict()["points"]


def cli_inputs(tmp_path):
    """REQUESTS and RANDOM_HP (without its layers) as the files the CLI reads."""
    requests = tmp_path / "req.json"
    requests.write_text(json.dumps([r.to_dict() for r in REQUESTS]))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({k: v for k, v in RANDOM_HP.to_dict().items() if k != "layers"}))
    return requests, hp


def test_cli_edit_memit_ft_l_and_bench_edits(random_model_dirs, corpus, tmp_path):
    from memlens.cli import app

    model = str(random_model_dirs["gpt2"])
    requests, hp = cli_inputs(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["edit", "memit", "--model", model, "--requests", str(requests),
                              "--layers", "1-2", "--hparams", str(hp), "--corpus", str(corpus),
                              "--save", str(tmp_path / "edited"), "--json"])
    assert out.exit_code == 0, out.output
    log = json.loads((tmp_path / "edited" / "edit_log.json").read_text())
    assert log["edits"][0]["method"] == "memit" and log["edits"][0]["layers"] == [1, 2]
    out = runner.invoke(app, ["edit", "ft-l", "--model", model, "--requests", str(requests),
                              "--layer", "2", "--n", "2"])
    # FT-L's ε = 5e-4 barely moves a random model: the edit did not take, the CLI says so
    assert out.exit_code != 0 and "did not take" in str(out.exception)
    out = runner.invoke(app, ["edit", "ft-l", "--model", model, "--requests", str(requests),
                              "--layer", "2", "--n", "2", "--allow-no-effect"])
    assert out.exit_code == 0, out.output
    assert "FT-L" in out.output and "max |ΔW|" in out.output
    out = runner.invoke(app, ["edit", "memit", "--model", model, "--requests", str(requests),
                              "--layers", "9"])
    assert out.exit_code != 0 and "out of range" in str(out.exception)


# ── the `tiny` organism ─────────────────────────────────────────────────────


@pytest.mark.slow
def test_memit_on_tiny_edits_many_facts_and_spares_unrelated_ones(tiny_handle, tiny_organism):
    """20 CounterFact edits in one batch. The generator-4 tiny reads its subjects into the last
    position at layer 0 (see the ROME test), so MEMIT edits there: fact token "last", layers
    1–2. Measured on the two tiny builds seen (CLI- and pytest-built corpora differ): ES 0 → 1.0,
    28/40 and 25/40 unrelated answers kept; at the subject's last token ES reached only 0.45–0.6."""
    from memlens.evaluate.counterfact import case_metrics, load_counterfact, summarize
    from memlens.studies.scaling import valid_cases

    handle = tiny_handle
    cases, _ = valid_cases(handle, load_counterfact(tiny_organism / "counterfact.json"), 20)
    edited = {c.request.subject for c in cases}
    known = [f for f in json.loads((tiny_organism / "known_facts.json").read_text())
             if f["subject"] not in edited][:40]
    answers = [greedy_answer(handle, f["prompt"], 1) for f in known]
    before = state(handle)
    pre = summarize([case_metrics(handle, c, generation=None) for c in cases])
    hp = MEMITHyperParams.for_model(handle, mom2_update_weight=300.0, clamp_norm_factor=4.0,
                                    context_templates=(), fact_token="last")
    edit = apply_memit(handle, [c.request for c in cases], layers=[1, 2], hparams=hp,
                       progress=False)
    post = summarize([case_metrics(handle, c, generation=None) for c in cases])
    kept = sum(greedy_answer(handle, f["prompt"], 1) == a for f, a in zip(known, answers,
                                                                          strict=True))
    edit.undo()
    assert_same_state(handle, before)
    assert post["ES"] >= 0.9 > pre["ES"]  # ≥ 18 of 20 edits made
    assert kept >= 0.6 * len(known)


def test_band_around_peak_leaves_out_the_last_layer_and_nan():
    from memlens.edit.layers import band_around_peak

    # the last layer's 0.9 is ignored: z there cannot reach the prediction
    assert band_around_peak([0.1, 0.5, 0.4, 0.1, 0.9]) == [1, 2]
    assert band_around_peak([float("nan"), 0.3, 0.2, 0.0]) == [1, 2]
    assert band_around_peak([0.3, 0.1, 0.0, 0.0]) == [0]
    assert band_around_peak([0.3, 0.1, 0.0, 0.0], threshold=0.2) == [0, 1]
    assert band_around_peak([-0.1, 0.0, 0.0]) is None


def test_layer_delta_refuses_a_system_that_is_not_positive_definite():
    K = torch.randn(8, 2, dtype=torch.float64)  # two keys cannot span d_ff = 8 without C
    with pytest.raises(NumericalError, match="not positive definite"):
        memit_layer_delta(K, torch.randn(3, 2), torch.zeros(8, 8, dtype=torch.float64), 1.0, 0)


def test_published_statistics_directory_serves_memit_and_the_cli(random_model_dirs, corpus,
                                                                 tmp_path, monkeypatch):
    """--stats-dir: the reference code's npz files are read, one layer at a time, when MEMIT
    needs them; the edit equals MEMIT given the same C's; layers without a file come from the
    corpus; a directory with none is refused."""
    import dataclasses

    import memlens.stats_io as stats_io
    from memlens.cli import app
    from memlens.model import load_model
    from memlens.stats import KeyStats, layer_stats
    from memlens.stats_io import ReferenceStatsDir, export_reference_stats, reference_stats_name

    model = str(random_model_dirs["gpt2"])
    handle = load_model(model, device="cpu")
    computed = layer_stats(handle, [1, 2], corpus=corpus, progress=False)
    published = tmp_path / "wikipedia_stats"
    for n, layer in ((40, 1), (40, 2), (10, 2)):  # two files of layer 2: the larger n is read
        stats = computed[layer] if n == 40 else KeyStats(2, torch.eye(handle.d_ff,
                                                                      dtype=torch.float64), 5)
        export_reference_stats(stats, published / reference_stats_name(handle, layer, n=n),
                               precision="float64")
    reads: list[int] = []
    imported = stats_io.import_reference_stats

    def counting(path, layer, **kwargs):
        reads.append(layer)
        return imported(path, layer, **kwargs)

    monkeypatch.setattr(stats_io, "import_reference_stats", counting)
    found = ReferenceStatsDir(published, handle)
    assert list(found) == [1, 2] and 2 in found and 0 not in found and reads == []
    assert found[2].disposable and torch.allclose(found[2].mom2, computed[2].mom2, rtol=1e-12)
    reads.clear()
    hp = dataclasses.replace(RANDOM_HP, layers=(1, 2))
    given = {layer: found[layer] for layer in (1, 2)}  # the same C's, held
    edit = apply_memit(handle, REQUESTS, hparams=hp, stats=given)
    expected = {layer: handle.arch.get_edit_weight(handle.model, layer).clone() for layer in (1, 2)}
    edit.undo()
    reads.clear()
    edit = apply_memit(handle, REQUESTS, hparams=hp, stats=found)
    for layer in (1, 2):
        assert torch.equal(handle.arch.get_edit_weight(handle.model, layer), expected[layer])
    assert edit.log["stats"]["2"]["count"] == computed[2].count
    assert edit.log["stats"]["2"]["corpus"].startswith("reference:")
    edit.undo()

    requests, hp_file = cli_inputs(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["edit", "memit", "--model", model, "--requests", str(requests),
                              "--layers", "0-1", "--hparams", str(hp_file), "--corpus",
                              str(corpus), "--stats-dir", str(published), "--json"])
    assert out.exit_code == 0, out.output
    log = json.loads(out.stdout)["stats"]
    assert log["1"]["corpus"].startswith("reference:") and not log["0"]["corpus"].startswith(
        "reference:")  # layer 0 has no file: computed from --corpus
    empty = tmp_path / "empty"
    empty.mkdir()
    one = tmp_path / "one.json"
    one.write_text(json.dumps(REQUESTS[0].to_dict()))
    out = runner.invoke(app, ["edit", "rome", "--model", model, "--request", str(one),
                              "--stats-dir", str(empty)])
    assert out.exit_code != 0 and "no reference statistics" in str(out.exception)
