"""ROME: rank-one updates on every architecture, undo, save, request checks, and the `tiny`
organism (the edited prompt answers the new target; unrelated facts keep theirs)."""

from __future__ import annotations

import json

import pytest
import torch

from memlens.edit import EditRequest, ROMEHyperParams, apply_rome, load_requests, save_edited
from memlens.edit.compute import Keys, mlp_output_of
from memlens.edit.context import context_templates
from memlens.edit.hparams import InvalidHyperParams
from memlens.edit.requests import InvalidRequest, greedy_answer
from memlens.edit.rome import rank_one_update
from memlens.edit.save import UnsafeSaveTarget
from memlens.errors import EmptyInput, MemlensError, NumericalError, SubjectNotFound
from memlens.ledger import apply_layer_deltas, edit_weight_name
from memlens.stats import KeyStats, layer_stats
from memlens.tokens import answer_ids

REQUEST = EditRequest("{} is a city in", "Toulouse", "the")
#: Random models have near-uniform logits and diffuse attention: edit at the last token,
#: without the norm penalty, so that 20 steps can move the target at all.
RANDOM_HP = ROMEHyperParams(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=1e4,
                            context_templates=((4, 4),))


pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")


def state(handle):
    return {k: v.clone() for k, v in handle.model.state_dict().items()}


def assert_same_state(handle, before):
    after = handle.model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def prob_of(handle, text, target):
    head = handle.tokenizer(text)["input_ids"]
    ids = answer_ids(handle.tokenizer, text, target)
    with torch.no_grad():
        logits = handle.model(torch.tensor([head + ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    return float(sum(log_probs[len(head) - 1 + j, t] for j, t in enumerate(ids)).exp())


def test_rome_is_rank_one_moves_the_target_and_undoes_bit_exact(random_handle, corpus):
    before = state(random_handle)
    fingerprint = random_handle.fingerprint()
    p_before = prob_of(random_handle, REQUEST.text, REQUEST.target_new)
    edit = apply_rome(random_handle, REQUEST, layer=1, hparams=RANDOM_HP, corpus=corpus,
                      progress=False)
    assert edit.layer == 1 and edit.log["layer_source"] == "user"
    p_after = prob_of(random_handle, REQUEST.text, REQUEST.target_new)
    assert p_after > 1.5 * p_before
    name = edit_weight_name(random_handle, 1)
    W_new = random_handle.arch.get_edit_weight(random_handle.model, 1).double()
    W_old = before[name].double()
    W_old = W_old.T if random_handle.arch.spec.mlp_out_transposed else W_old
    s = torch.linalg.svdvals(W_new - W_old)
    assert s[1] / s[0] < 1e-5  # rank one (up to float32 rounding of W + ΔW)
    assert edit.delta_norms[1] == pytest.approx(float(s[0]), rel=1e-4)
    changed = [k for k, v in random_handle.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [name]
    assert random_handle.fingerprint() != fingerprint
    edit.undo()
    assert_same_state(random_handle, before)
    assert random_handle.fingerprint() == fingerprint


def test_each_update_form_inserts_its_keys(random_handle):
    """"mean": (W + ΔW) k* + b = v*; "legacy": (W + ΔW) k_bare + b = v*; "both": ΔW adds
    δ = v* − W k* − b at k* and at k_bare alike."""
    gen = torch.Generator().manual_seed(0)
    d_ff, d_model = random_handle.d_ff, random_handle.d_model
    keys = torch.randn(3, d_ff, generator=gen).abs()
    k = Keys(k_star=keys.mean(0), keys=keys, positions=[0, 0, 0])
    v_star = torch.randn(d_model, generator=gen)
    A = torch.randn(d_ff, d_ff, generator=gen, dtype=torch.float64)
    C = A @ A.T / d_ff + torch.eye(d_ff, dtype=torch.float64)
    W = random_handle.arch.get_edit_weight(random_handle.model, 0).double()
    bias = mlp_output_of(random_handle, 0, torch.zeros(d_ff)).double()
    delta = v_star.double() - (W @ k.k_star.double() + bias)
    for form, inserted in (("mean", k.k_star), ("legacy", k.k_bare)):
        update = rank_one_update(random_handle, 0, k, v_star, C, update=form)
        new_out = (W + update.delta) @ inserted.double() + bias
        torch.testing.assert_close(new_out, v_star.double(), rtol=1e-6, atol=1e-6)
        assert float(update.left @ update.left) > 0
    both = rank_one_update(random_handle, 0, k, v_star, C, update="both").delta
    for key in (k.k_star, k.k_bare):
        torch.testing.assert_close(both @ key.double(), delta, rtol=1e-6, atol=1e-6)
    assert torch.linalg.matrix_rank(both) == 1


def test_two_key_update_is_the_mean_update_when_the_bare_key_is_k_star(random_handle):
    gen = torch.Generator().manual_seed(1)
    d_ff, d_model = random_handle.d_ff, random_handle.d_model
    k_star = torch.randn(d_ff, generator=gen).abs()
    k = Keys(k_star=k_star, keys=torch.stack([k_star, k_star]), positions=[0, 0])
    v_star = torch.randn(d_model, generator=gen)
    mean = rank_one_update(random_handle, 0, k, v_star, None, update="mean").delta
    both = rank_one_update(random_handle, 0, k, v_star, None, update="both").delta
    torch.testing.assert_close(both, mean, rtol=1e-6, atol=1e-9)


def test_bad_requests_fail_before_any_weight_changes(random_handle, corpus, monkeypatch):
    before = state(random_handle)
    with pytest.raises(SubjectNotFound):
        apply_rome(random_handle, {"prompt": "Paris is a city in", "subject": "Toulouse",
                                   "target_new": "Japan"}, layer=1, corpus=corpus)
    with pytest.raises(EmptyInput):
        apply_rome(random_handle, {"prompt": "{} is in", "subject": "Toulouse",
                                   "target_new": "  "}, layer=1, corpus=corpus)
    import memlens.edit.requests as requests_module

    with monkeypatch.context() as patch:  # pretend the model already answers "the"
        patch.setattr(requests_module, "greedy_answer", lambda h, text, n: answer_ids(
            h.tokenizer, text, REQUEST.target_new))
        with pytest.raises(InvalidRequest, match="already answers"):
            apply_rome(random_handle, REQUEST, layer=1, corpus=corpus)
    with pytest.raises(InvalidRequest, match="equals target_true"):
        apply_rome(random_handle, EditRequest(REQUEST.prompt, REQUEST.subject, "Japan",
                                              "Japan"), layer=1, corpus=corpus)
    nan_stats = KeyStats(1, torch.full((random_handle.d_ff,) * 2, float("nan"),
                                       dtype=torch.float64), 10)
    with pytest.raises(NumericalError):
        apply_rome(random_handle, REQUEST, layer=1, stats=nan_stats)
    singular = KeyStats(1, torch.zeros((random_handle.d_ff,) * 2, dtype=torch.float64), 10)
    with pytest.raises(NumericalError, match="positive definite"):
        apply_rome(random_handle, REQUEST, layer=1, stats=singular, hparams=RANDOM_HP)
    with pytest.raises(NumericalError):
        apply_layer_deltas(random_handle, {1: torch.full((random_handle.d_model,
                                                          random_handle.d_ff), float("inf"))})
    assert_same_state(random_handle, before)


def test_save_writes_a_new_directory_and_refuses_unsafe_targets(random_model_dirs, corpus,
                                                                 tmp_path):
    from memlens.model import load_model

    source = random_model_dirs["gpt2"]
    handle = load_model(str(source), device="cpu")
    source_files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    edit = apply_rome(handle, REQUEST, layer=2, hparams=RANDOM_HP, corpus=corpus,
                      progress=False)
    with pytest.raises(UnsafeSaveTarget, match="source model"):
        save_edited(handle, source, edit)
    with pytest.raises(UnsafeSaveTarget, match="source model"):
        save_edited(handle, source / "sub", edit)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with pytest.raises(UnsafeSaveTarget, match="not an empty"):
        save_edited(handle, busy, edit)
    out = save_edited(handle, tmp_path / "edited", edit)
    log = json.loads((out / "edit_log.json").read_text())
    assert log["edits"][0]["layer"] == 2
    assert log["edits"][0]["hparams"]["fact_token"] == "last"
    assert log["edits"][0]["requests"][0]["subject"] == "Toulouse"
    assert "2" in log["edits"][0]["delta_norms"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left
    reloaded = load_model(str(out), device="cpu")
    ids = handle.encode([REQUEST.text]).input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, handle.model(ids).logits)
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == source_files
    edit.undo()
    with pytest.raises(MemlensError, match="undone"):
        save_edited(handle, tmp_path / "again", edit)


def test_out_of_order_undo_is_refused(random_model_dirs):
    from memlens.model import load_model

    handle = load_model(str(random_model_dirs["gpt2"]), device="cpu")
    before = state(handle)
    shape = (handle.d_model, handle.d_ff)
    first = apply_layer_deltas(handle, {1: torch.full(shape, 0.01)})
    second = apply_layer_deltas(handle, {1: torch.full(shape, 0.02)})
    with pytest.raises(MemlensError, match="undo the later edits first"):
        first.undo()
    second.undo()
    first.undo()
    assert_same_state(handle, before)
    with apply_layer_deltas(handle, {0: torch.full(shape, 0.5)}):
        assert not torch.equal(handle.model.state_dict()[edit_weight_name(handle, 0)],
                               before[edit_weight_name(handle, 0)])
    assert_same_state(handle, before)


def test_requests_load_flat_and_counterfact_records(tmp_path):
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps([
        {"prompt": "{} is a city in", "subject": "Toulouse", "target_new": "Japan"},
        {"case_id": 7, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
                                             "target_new": {"str": "piano"},
                                             "target_true": {"str": "trumpet"}}},
        {"prompt": "Toulouse is a city in", "subject": "Toulouse", "target_new": "Japan"},
    ]))
    flat, record, untemplated = load_requests(path)
    assert flat.text == "Toulouse is a city in" and flat.target_true is None
    assert record.target_new == "piano" and record.target_true == "trumpet"
    assert record.case_id == 7
    assert untemplated.prompt == "{} is a city in"
    with pytest.raises(InvalidRequest, match="lacks"):
        EditRequest.from_dict({"prompt": "{} x"}, index=3)
    with pytest.raises(InvalidRequest, match="exactly one"):
        EditRequest("{} and {}", "a", "b")


def test_answer_ids_add_the_leading_space(random_model_dirs):
    from memlens.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    assert answer_ids(tok, "Toulouse is a city in", "France") == \
        tok(" France", add_special_tokens=False)["input_ids"]
    assert answer_ids(tok, "Toulouse is a city in", " France") == \
        answer_ids(tok, "Toulouse is a city in", "France")


def test_hparams_defaults_file_overrides_and_errors(tmp_path, random_handle):
    hp = ROMEHyperParams.for_model(random_handle)
    assert (hp.v_lr, hp.v_num_grad_steps, hp.kl_factor, hp.clamp_norm_factor) == \
        (0.5, 20, 0.0625, 4.0)
    assert hp.v_weight_decay == 0.5 and hp.fact_token == "subject_last"
    json_file = tmp_path / "hp.json"
    json_file.write_text(json.dumps({"v_lr": 0.1, "context_templates": [[3, 2]]}))
    hp = ROMEHyperParams.for_model(random_handle, path=json_file, v_num_grad_steps=5)
    assert (hp.v_lr, hp.v_num_grad_steps, hp.context_templates) == (0.1, 5, ((3, 2),))
    yaml_file = tmp_path / "hp.yaml"
    yaml_file.write_text("fact_token: last\nkl_factor: 0.1\n")
    assert ROMEHyperParams.for_model(random_handle, path=yaml_file).fact_token == "last"
    assert ROMEHyperParams.from_dict(hp.to_dict()) == hp
    with pytest.raises(InvalidHyperParams, match="unknown"):
        ROMEHyperParams.from_dict({"v_lrr": 1})
    with pytest.raises(InvalidHyperParams, match="fact_token"):
        ROMEHyperParams(fact_token="middle").check()


def test_organisms_get_their_own_defaults_below_files_and_keywords(tmp_path, random_handle):
    from dataclasses import replace as dc_replace

    from memlens.edit.memit import MEMITHyperParams

    (tmp_path / "organism.json").write_text("{}")
    organism = dc_replace(random_handle, source_dir=tmp_path)
    hp = ROMEHyperParams.for_model(organism)
    assert (hp.clamp_norm_factor, hp.v_weight_decay) == (20.0, 0.05)
    assert ROMEHyperParams.for_model(organism, clamp_norm_factor=4.0).clamp_norm_factor == 4.0
    assert MEMITHyperParams.for_model(organism).mom2_update_weight == 300.0
    assert MEMITHyperParams.for_model(random_handle).mom2_update_weight >= 15000.0


def test_context_templates_are_generated_once_and_cached(random_model_dirs, tmp_path):
    from memlens.edit import context as context_module
    from memlens.model import load_model

    handle = load_model(str(random_model_dirs["llama"]), device="cpu")
    templates = context_templates(handle, ((3, 2), (5, 2)))
    assert templates[0] == "{}" and len(templates) == 5
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])
    files = list((tmp_path / "home" / "context").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == templates
    context_module._MEMORY.clear()
    assert context_templates(handle, ((3, 2), (5, 2))) == templates  # from disk


# ── the `tiny` organism ─────────────────────────────────────────────────────

#: tiny's MLP outputs at the subject are small (‖v₀‖ ≈ 3) next to the change a new fact needs:
#: with the reference clamp (4 ‖v₀‖) δ saturates and ES stays near 0; a wider ball fixes it.
#: tiny (generator 4) reads place subjects into the last position at layer 0 — restoring the
#: last subject token's layer-1 state recovers ≤ 10% of TE on 40 place facts — so its facts are
#: edited where they are recalled: at the last token (measured: 10 of 10 at layers 0, 1 and 2;
#: at the subject's last token 1–3 of 10 even with clamp 100).
TINY_HP = ROMEHyperParams(clamp_norm_factor=20.0, v_weight_decay=0.05, fact_token="last")


@pytest.mark.slow
def test_rome_on_tiny_rewrites_the_fact_and_spares_unrelated_facts(tiny_handle, tiny_organism):
    from memlens.evaluate.counterfact import load_counterfact

    handle = tiny_handle
    cases = load_counterfact(tiny_organism / "counterfact.json")
    known = json.loads((tiny_organism / "known_facts.json").read_text())
    before = state(handle)
    stats = layer_stats(handle, [2], progress=False)
    successes = 0
    places = [c for c in cases if not (c.relation_id or "").startswith("person")]
    for case in places[:10]:
        req = case.request
        others = [f for f in known if f["subject"] != req.subject][::5]
        answers = [greedy_answer(handle, f["prompt"], 1) for f in others]
        edit = apply_rome(handle, req, layer=2, stats=stats, hparams=TINY_HP, progress=False)
        new_ids = answer_ids(handle.tokenizer, req.text, req.target_new)
        successes += greedy_answer(handle, req.text, len(new_ids)) == new_ids
        kept = sum(greedy_answer(handle, f["prompt"], 1) == a for f, a in zip(others, answers, strict=True))
        assert kept >= 0.9 * len(others)
        edit.undo()
        assert_same_state(handle, before)
    assert successes >= 8  # measured: 10 of 10, ≥ 95% of unrelated answers kept


@pytest.mark.slow
def test_target_equal_to_the_current_answer_is_refused_on_tiny(tiny_handle, tiny_organism):
    fact = json.loads((tiny_organism / "known_facts.json").read_text())[0]
    before = state(tiny_handle)
    with pytest.raises(InvalidRequest, match="already answers"):
        apply_rome(tiny_handle, {"prompt": fact["prompt"], "subject": fact["subject"],
                                 "target_new": fact["attribute"]}, layer=1, progress=False)
    assert_same_state(tiny_handle, before)


def spd(d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / (3 * d)


def test_left_vector_factors_in_c_own_buffer_only_when_allowed():
    from memlens.edit.rome import left_vector

    C, k = spd(12), torch.randn(12, 2, dtype=torch.float64)
    kept = C.clone()
    u = left_vector(C, k, layer=0)
    assert torch.equal(C, kept)  # the caller's C is untouched
    torch.testing.assert_close(u[:, 1], left_vector(C, k[:, 1], layer=0), rtol=1e-12,
                               atol=1e-12)  # one key = a column (up to the BLAS' rounding)
    torch.testing.assert_close(kept @ u, k, rtol=1e-9, atol=1e-9)
    mine = C.clone()
    assert torch.equal(left_vector(mine, k, layer=0, overwrite_c=True), u)
    assert torch.equal(mine.tril(), torch.linalg.cholesky(kept))  # the buffer holds L now
    dead = spd(12)  # units 3 and 7 never fire: zero rows and columns
    dead[[3, 7]] = 0
    dead[:, [3, 7]] = 0
    before = dead.clone()
    u_dead = left_vector(dead, k, layer=0, overwrite_c=True)  # solved on a copy of the live
    assert torch.equal(dead, before) and (u_dead[[3, 7]] == 0).all()
    with pytest.raises(NumericalError, match="not positive definite"):
        left_vector(torch.zeros(4, 4, dtype=torch.float64), torch.ones(4), layer=0)


def test_rome_overwrites_only_statistics_it_owns(random_handle, corpus, monkeypatch):
    import memlens.edit.rome as rome_module
    from memlens.stats import StatsFiles

    flags: list[bool] = []
    solve = rome_module.left_vector

    def spy(C, k, layer, *, overwrite_c=False):
        flags.append(overwrite_c)
        return solve(C, k, layer, overwrite_c=overwrite_c)

    monkeypatch.setattr(rome_module, "left_vector", spy)
    held = layer_stats(random_handle, [1], corpus=corpus, progress=False)
    kept = held[1].mom2.clone()
    edit = apply_rome(random_handle, REQUEST, layer=1, hparams=RANDOM_HP, stats=held)
    delta = edit.delta_norms[1]
    edit.undo()
    assert torch.equal(held[1].mom2, kept) and flags == [False]  # the caller's C
    files = layer_stats(random_handle, [1], corpus=corpus, progress=False, max_pass_bytes=1)
    assert isinstance(files, StatsFiles)
    edit = apply_rome(random_handle, REQUEST, layer=1, hparams=RANDOM_HP, stats=files)
    assert edit.delta_norms[1] == delta and flags == [False, True]  # read for this edit alone
    edit.undo()
    edit = apply_rome(random_handle, REQUEST, layer=1, hparams=RANDOM_HP, corpus=corpus)
    assert edit.delta_norms[1] == delta and flags == [False, True, True]  # computed here
    assert edit.log["stats"]["trace"] == pytest.approx(float(kept.trace()), rel=1e-12)
    edit.undo()
