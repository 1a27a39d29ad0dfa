"""TopK LMs: the activation, model conversion + save/load, training, neuron entropies, steering."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from memlens import hooks
from memlens.testing import TEXT, random_model
from memlens.topk import TopK, TopKError, alpha_at, set_alpha, to_topk, topk_modules
from memlens.topk_mlp import apply_topk_from_config

K = 8  # units kept in tests (d_ff of the tiny models is 128)


# ── the activation ────────────────────────────────────────────────────────────


def test_topk_keeps_exactly_k_units_per_position():
    x = torch.randn(3, 5, 128)
    y = TopK(K)(x)
    assert ((y != 0).sum(-1) == K).all()
    expected = torch.relu(x) * (x >= x.topk(K, dim=-1).values[..., -1:])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_topk_handles_ties_exactly():
    x = torch.ones(2, 4, 32)  # every unit ties: a threshold compare would keep all 32
    x[1, :, :10] = 2.0  # 10 tied winners, only K = 8 may stay
    act = TopK(K)
    assert ((act(x) != 0).sum(-1) == K).all()
    assert (act.mask(x).sum(-1) == K).all()
    assert (act(x)[1][act(x)[1] != 0] == 2.0).all()


def test_gradients_flow_only_through_kept_units():
    x = torch.randn(4, 64, requires_grad=True)
    act = TopK(K)
    act(x).pow(2).sum().backward()
    kept = act.mask(x.detach()) & (x.detach() > 0)
    assert (x.grad[~kept] == 0).all()
    assert (x.grad[kept] != 0).all()


def test_annealing_interpolates_between_dense_and_topk():
    x = torch.randn(2, 3, 64)
    act = TopK(K, alpha=1.0)
    torch.testing.assert_close(act(x), torch.relu(x), rtol=0, atol=0)
    act.alpha = 0.0
    sparse = act(x)
    assert ((sparse != 0).sum(-1) == K).all()
    act.alpha = 0.25
    torch.testing.assert_close(act(x), 0.25 * torch.relu(x) + 0.75 * sparse)


def test_alpha_schedule_is_linear_over_the_first_fifth():
    assert alpha_at(0, 100) == 1.0
    assert alpha_at(10, 100) == pytest.approx(0.5)
    assert alpha_at(20, 100) == 0.0 and alpha_at(99, 100) == 0.0
    assert alpha_at(5, 100, anneal_ratio=0.0) == 0.0
    with pytest.raises(TopKError):
        alpha_at(1, 10, anneal_ratio=1.5)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(TopKError, match="positive integer"):
        TopK(0)
    with pytest.raises(TopKError, match="unknown TopK activation"):
        TopK(4, activation="tanh")
    with pytest.raises(TopKError, match="exceeds"):
        TopK(200)(torch.randn(2, 128))
    model, _ = random_model("gpt2")
    with pytest.raises(TopKError, match="d_ff=128"):
        to_topk(model, k=129)
    with pytest.raises(TopKError, match="n_last_nontopk"):
        to_topk(model, k=4, n_last_nontopk=4)
    with pytest.raises(TopKError, match="subset"):
        to_topk(model, k=4, layers=[7])
    model.config.topk = {"k": 4, "layers": [0], "bogus": 1}
    with pytest.raises(TopKError, match="bogus"):
        apply_topk_from_config(model)


# ── conversion, hooks, save/load ──────────────────────────────────────────────


@pytest.fixture(params=["gpt2", "llama"])
def topk_model(request):
    model, tokenizer = random_model(request.param)
    to_topk(model, k=K)
    return model, tokenizer


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(["The Eiffel Tower is located in Paris."], return_tensors="pt").input_ids


def test_conversion_makes_the_down_projection_input_exactly_k_sparse(topk_model):
    model, tokenizer = topk_model
    assert sorted(topk_modules(model)) == [0, 1]  # 4 layers, the last 2 stay dense
    assert model.config.topk["k"] == K and model.config.topk["layers"] == [0, 1]
    points = [f"blocks.{layer}.mlp.hook_post" for layer in range(4)]
    with hooks.capture(model, points) as cache:
        model(_ids(tokenizer))
    for layer, point in enumerate(points):
        nonzero = (cache[point] != 0).sum(-1)
        assert (nonzero == K).all() if layer < 2 else (nonzero > K).all()


def test_other_capabilities_hooks_work_on_topk_models(topk_model):
    model, tokenizer = topk_model
    ids = _ids(tokenizer)
    names = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out",
             "blocks.1.hook_resid_post", "blocks.1.hook_attn_out", "hook_embed"]
    with torch.no_grad(), hooks.capture(model, names) as cache:
        clean = model(ids).logits
    assert set(cache) == set(names)
    d_ff = cache["blocks.0.mlp.hook_post"].shape[-1]
    with torch.no_grad(), hooks.add(model, "blocks.0.mlp.hook_post", torch.full((d_ff,), 0.5)):
        steered = model(ids).logits
    assert not torch.allclose(clean, steered)
    from memlens.arch import adapter_for

    assert adapter_for(model).get_edit_weight(model, 0).shape[1] == d_ff


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_topk_model_round_trips_through_load_model(topk_model, tmp_path, alpha):
    import memlens

    model, tokenizer = topk_model
    set_alpha(model, alpha)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    handle = memlens.load_model(str(tmp_path), device="cpu")
    modules = topk_modules(handle.model)
    assert sorted(modules) == [0, 1] and all(m.alpha == alpha and m.k == K
                                             for m in modules.values())
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(handle.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    generated = handle.model.generate(ids, max_new_tokens=5, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == ids.shape[1] + 5


# ── training ──────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    from memlens.topk.data import text_blocks
    from memlens.topk.train import TopKTrainConfig, train_pair

    model, tokenizer = random_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    train, heldout = text_blocks(tokenizer, (TEXT + "\n") * 10, block_size=32)
    cfg = TopKTrainConfig(k=K, steps=12, batch_size=8, warmup_steps=2, num_threads=1,
                          progress=False, checkpoint_every=0)
    out = tmp_path_factory.mktemp("topk-pair")
    return train_pair(model.config, tokenizer, train, heldout, cfg, out), out, tokenizer


def test_train_pair_reports_exact_sparsity_and_perplexity(trained_pair):
    pair, out, _ = trained_pair
    for layer in pair.topk.sparsity[:2]:
        assert layer["nonzero_min"] == layer["nonzero_max"] == K
        assert 0.0 <= layer["dead_fraction"] < 1.0
    assert all(s["nonzero_min"] == 128 for s in pair.dense.sparsity)
    assert math.isfinite(pair.ppl_ratio) and pair.dense.heldout_ppl > 1
    assert pair.topk.topk["alpha"] == 0.0 and pair.dense.topk is None
    assert (out / "topk" / "train_result.json").is_file()
    json.dumps(pair.to_dict())


def test_twins_start_identical_and_finished_runs_are_reused(trained_pair):
    from memlens.topk.train import fresh_model, train_pair

    pair, out, tokenizer = trained_pair
    model, _ = random_model("gpt2")
    a, b = fresh_model(model.config, seed=3).state_dict(), fresh_model(model.config, 3).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    from memlens.topk.train import TopKTrainConfig

    same = TopKTrainConfig(**pair.config)
    again = train_pair(None, tokenizer, None, None, same, out)  # nothing to train: loads both
    assert again.topk.heldout_ppl == pair.topk.heldout_ppl
    with pytest.raises(TopKError, match="other settings"):
        train_pair(None, tokenizer, None, None, TopKTrainConfig(k=K + 1), out)


def test_alpha_callback_anneals_during_training():
    from memlens.topk.train import AlphaSchedule
    from memlens.trainer import TrainConfig, train

    model, _ = random_model("llama")
    to_topk(model, k=K, alpha=1.0)
    seen: list[float] = []
    schedule = AlphaSchedule(model, anneal_ratio=0.5)
    callbacks = [schedule, lambda step, total: seen.append(topk_modules(model)[0].alpha)]
    data = torch.randint(0, 300, (16, 16))
    train(model, data, TrainConfig(steps=4, batch_size=4, warmup_steps=1, num_threads=1,
                                   progress=False), callbacks=callbacks)
    assert seen == [1.0, 0.5, 0.0, 0.0]


# ── neurons and steering ──────────────────────────────────────────────────────


def test_entropy_formulas():
    from memlens.topk.neurons import semantic_entropy, token_entropy

    mass = torch.zeros(10, 3, dtype=torch.float64)
    mass[4, 0] = 2.0  # neuron 0: one token → 0
    mass[:, 1] = 1.0  # neuron 1: uniform over 10 tokens → log 10
    h = token_entropy(mass)  # neuron 2 never fires → NaN
    assert h[0] == 0 and h[1] == pytest.approx(math.log(10)) and math.isnan(h[2])
    same = torch.ones(5, 4)
    assert semantic_entropy(same) == 0.0  # all similarities 1: one bin
    spread = torch.eye(4)[[0, 0, 1]]  # similarities {1, 0, 0}: bins with p = 1/3, 2/3
    expected = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    assert semantic_entropy(spread) == pytest.approx(expected)


@pytest.fixture(scope="module")
def trained_topk_handle(trained_pair):
    import memlens

    _, out, _ = trained_pair
    return memlens.load_model(str(out / "topk"), device="cpu")


def test_neuron_report_on_a_topk_model(trained_topk_handle):
    from memlens.topk.data import neuron_blocks
    from memlens.topk.neurons import NeuronReport, neuron_report

    handle = trained_topk_handle
    blocks = neuron_blocks(handle.tokenizer, TEXT, 32)
    report = neuron_report(handle, blocks)
    assert [e.is_topk for e in report.layers] == [True, True, False, False]
    vocab = handle.arch.embedding(handle.model).weight.shape[0]
    for entry in report.layers:
        assert len(entry.token_entropy) == len(entry.top_tokens) == 128
        assert all(0 <= h <= math.log(vocab) + 1e-6 for h in entry.token_entropy if h is not None)
        assert all(0 <= h <= math.log2(20) for h in entry.semantic_entropy if h is not None)
    eos = handle.tokenizer.eos_token_id
    assert all(eos not in ids for e in report.layers for ids in e.top_token_ids)
    back = NeuronReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.summary() == report.summary()
    with pytest.raises(TopKError, match="vocabulary"):
        neuron_report(handle, torch.full((1, 4), 10**6))


def test_steering_with_zero_delta_equals_no_steering(trained_topk_handle):
    from memlens.topk.steer import steer

    handle = trained_topk_handle
    prompts = ["The Eiffel Tower", "Miles Davis plays"]
    plain = []
    for prompt in prompts:
        ids = handle.encode([prompt]).input_ids
        out = handle.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)
        plain.append(out[0, ids.shape[1]:].tolist())
    assert steer(handle, 0, 3, 0.0, prompts, max_new_tokens=8) == plain
    assert steer(handle, 0, 3, 500.0, prompts, max_new_tokens=8) != plain


def test_steer_report_and_auto_pick(trained_topk_handle):
    from memlens.topk.data import neuron_blocks
    from memlens.topk.neurons import neuron_report
    from memlens.topk.steer import auto_neurons, parse_neuron, steer_report

    handle = trained_topk_handle
    report = neuron_report(handle, neuron_blocks(handle.tokenizer, TEXT, 32))
    picks = auto_neurons(report, n=3, min_tokens=2)
    assert picks and all(p.layer in (0, 1) and len(p.token_ids) >= 2 for p in picks)
    zs = [p.self_logit_z for p in picks]
    assert zs == sorted(zs, reverse=True)  # strongest writers of their own concept first
    pool = sorted(s for e in report.layers[:2] for s, ids in zip(e.semantic_entropy,
                  e.top_token_ids, strict=True) if s is not None and len(ids) >= 2)
    assert all(p.semantic_entropy <= pool[math.ceil(len(pool) / 2) - 1] for p in picks)
    assert all(p.delta_scale > 0 for p in picks)
    neuron = picks[0]
    result = steer_report(handle, neuron.layer, neuron.unit, neuron.token_ids, [0.0, 50.0],
                          ["The capital of"], max_new_tokens=6)
    assert [r.delta for r in result.results] == [50.0]  # δ = 0 is the baseline, not repeated
    assert result.baseline.n_tokens == 6 and result.best_ratio > 0
    json.dumps(result.to_dict())
    assert parse_neuron("2:17") == (2, 17)
    with pytest.raises(TopKError, match="LAYER:UNIT"):
        parse_neuron("2-17")
    from memlens.topk.steer import steer

    with pytest.raises(TopKError, match="unit 999"):
        steer(handle, 0, 999, 1.0, ["The"])


# ── one command for the whole study ───────────────────────────────────────────


def test_run_all_writes_summary_and_figure(tmp_path):
    from memlens.studies.topk import run_all
    from memlens.testing import random_model_dir
    from memlens.topk.train import TopKTrainConfig

    organism = random_model_dir("llama", tmp_path)
    sentences = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    (organism / "corpus.txt").write_text("\n".join(sentences * 8))
    cfg = TopKTrainConfig(k=K, steps=8, batch_size=8, warmup_steps=2, num_threads=1,
                          progress=False, checkpoint_every=0)
    summary = run_all(str(organism), tmp_path / "run", cfg, n_auto=2, n_neuron_blocks=64,
                      max_new_tokens=5)
    out = Path(tmp_path / "run")
    for name in ("summary.json", "summary.md", "entropy_by_layer.png", "steer.json",
                 "neurons_topk.json", "neurons_dense.json"):
        assert (out / name).is_file(), name
    assert set(summary["checks"]) == {"ppl_within_15pct", "topk_entropy_lower",
                                      "steering_several_fold"}
    assert summary["sparsity_topk"][0]["nonzero_max"] == K
    # a second run with the models kept elsewhere trains there once, then only reuses them
    shared = tmp_path / "shared"
    first = run_all(str(organism), tmp_path / "run2", cfg, n_auto=1, n_neuron_blocks=16,
                    max_new_tokens=3, models=shared)
    assert (shared / "topk" / "config.json").is_file() and not (tmp_path / "run2" / "topk").exists()
    stamp = (shared / "topk" / "model.safetensors").stat().st_mtime_ns
    again = run_all(str(organism), tmp_path / "run3", cfg, n_auto=1, n_neuron_blocks=16,
                    max_new_tokens=3, models=shared)
    assert (shared / "topk" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["heldout_ppl"] == first["heldout_ppl"]


def test_cli_steer_and_neurons(tmp_path, trained_pair):
    from typer.testing import CliRunner

    from memlens.cli import app

    _, out, _ = trained_pair
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    runner = CliRunner()
    result = runner.invoke(app, ["topk", "steer", "--model", str(out / "topk"), "--neuron", "0:3",
                                 "--delta", "20", "--prompt", "The capital", "--corpus",
                                 str(corpus), "--max-new-tokens", "4", "--out",
                                 str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "steer.json").read_text())[0]["unit"] == 3
    result = runner.invoke(app, ["topk", "neurons", "--model", str(out / "topk"), "--compare",
                                 str(out / "dense"), "--corpus", str(corpus), "--out",
                                 str(tmp_path / "n")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "n" / "entropy_by_layer.png").is_file()
