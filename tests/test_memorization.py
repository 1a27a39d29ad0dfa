"""Paragraph memorization: EM / NLL against a slow reference, masks, undo, heads, pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memlens.errors import EmptyInput, MemlensError
from memlens.memorization import (
    ContrastiveObjective,
    CorpusNotFound,
    Paragraph,
    ParagraphTooShort,
    evaluate,
    exact_match_length,
    gradient_mask,
    greedy_continuation,
    head_analysis,
    kendall_tau,
    kq_scores,
    load_paragraphs,
    paragraph_tensor,
    perturb,
    run_update,
    save_model,
    scan,
    sparse_update,
    weight_slots,
)
from memlens.memorization.heads import dense_rank, prefix_attention
from memlens.memorization.perturb import swap_tokens
from memlens.studies.memorization import Settings, run_all

P, S = 10, 10  # short prefix / suffix for random models


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def handles(random_model_dirs):
    from memlens.model import load_model

    return {t: load_model(str(random_model_dirs[t]), device="cpu")
            for t in ("gpt2", "gpt_neo", "gpt_neox", "llama")}


def synthetic(handle, n: int = 4, seed: int = 0) -> tuple[list[Paragraph], list[Paragraph]]:
    """'Memorized' paragraphs (suffix = the model's own greedy continuation) and random ones."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 300, (n, P), generator=g)
    memorized = torch.cat([prefix, greedy_continuation(handle.model, prefix, S)], dim=1)
    random = torch.randint(0, 300, (n, P + S), generator=g)
    mp = [Paragraph(f"m{i}", row, repeats=64) for i, row in enumerate(memorized.tolist())]
    nmp = [Paragraph(f"r{i}", row, repeats=1) for i, row in enumerate(random.tolist())]
    return mp, nmp


def slow_reference(model, ids: list[int], prefix_len: int) -> tuple[int, float]:
    """EM and suffix NLL one token at a time, without any cache, one paragraph alone."""
    seq = list(ids[:prefix_len])
    em, matching = 0, True
    for t in range(prefix_len, len(ids)):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if matching and nxt == ids[t]:
            em += 1
        else:
            matching = False
        seq.append(nxt)
    nll = []
    for t in range(prefix_len, len(ids)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
        nll.append(-F.log_softmax(logits.float(), -1)[ids[t]].item())
    return em, sum(nll) / len(nll)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neo", "gpt_neox", "llama"])
def test_em_and_nll_match_slow_token_by_token_reference(handles, model_type):
    handle = handles[model_type]
    mp, nmp = synthetic(handle, n=2)
    # A paragraph that matches for exactly 4 tokens, then diverges.
    partial = list(mp[0].token_ids)
    partial[P + 4] = (partial[P + 4] + 1) % 300
    paragraphs = [*mp, *nmp, Paragraph("partial", partial)]
    ev = evaluate(handle.model, paragraph_tensor(paragraphs), P, batch_size=3)
    for i, p in enumerate(paragraphs):
        em, nll = slow_reference(handle.model, p.token_ids, P)
        assert int(ev.em[i]) == em, p.id
        assert float(ev.nll[i]) == pytest.approx(nll, rel=1e-4, abs=1e-4), p.id
    assert ev.em.tolist()[:2] == [S, S] and int(ev.em[-1]) == 4


def test_exact_match_counts_until_first_mismatch():
    true = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    pred = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4]])
    assert exact_match_length(pred, true).tolist() == [4, 1, 0]


def test_scan_separates_synthetic_mp_from_nmp(handles):
    handle = handles["gpt_neo"]
    mp, nmp = synthetic(handle)
    result = scan(handle, mp + nmp, prefix_len=P, nmp_max_em=2)
    assert set(result.mp_ids) == {p.id for p in mp}
    assert set(result.nmp_ids) == {p.id for p in nmp}
    table = {row["repeats"]: row for row in result.table()}
    assert table[64]["MP"] == len(mp) and table[1]["NMP"] == len(nmp)
    json.dumps(result.to_dict())


def test_bad_inputs_give_clear_errors(handles, tmp_path):
    handle = handles["gpt2"]
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"id": "tiny-one", "text": "too short"}) + "\n")
    with pytest.raises(ParagraphTooShort, match="tiny-one.*50 \\+ 50 = 100"):
        load_paragraphs(handle, short)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(EmptyInput, match="no paragraphs"):
        load_paragraphs(handle, empty)
    with pytest.raises(CorpusNotFound, match="paragraphs.jsonl"):
        load_paragraphs(handle)  # a random model has no paragraphs.jsonl
    with pytest.raises(MemlensError, match="exceed the model's context of 128"):
        load_paragraphs(handle, short, prefix_len=100, suffix_len=100)
    with pytest.raises(CorpusNotFound, match="does not exist"):
        load_paragraphs(handle, tmp_path / "missing.jsonl")
    with pytest.raises(EmptyInput, match="memorized"):
        ContrastiveObjective.build(handle.model, torch.zeros(0, P + S, dtype=torch.long),
                                   torch.zeros(2, P + S, dtype=torch.long), prefix_len=P)


def test_cli_reports_short_paragraph_in_one_line(random_model_dirs, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("first paragraph is long enough maybe\n\nshort")
    proc = subprocess.run(
        [sys.executable, "-c", "from memlens.cli import main; main()", "memorization", "scan",
         "--model", str(random_model_dirs["gpt2"]), "--corpus", str(corpus),
         "--prefix-len", "3", "--suffix-len", "3", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: paragraph '1'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama"])
def test_attn_head_view_reproduces_the_projection(model_type):
    """Per-head weight views (fused GPT-2 Conv1D, fused NeoX, separate + GQA) give the same
    queries/keys as the model's own projection, biases zeroed."""
    from memlens import hooks
    from memlens.arch import HookPoint, adapter_for
    from memlens.testing import random_model

    model, _ = random_model(model_type)
    arch = adapter_for(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and ("attn" in name or "attention" in name):
                p.zero_()
    ids = torch.randint(0, 300, (1, 7))
    layer = 1
    inp = HookPoint(arch.module_name(layer, "attn"), "input")
    if arch.spec.qkv:
        outs = [HookPoint(arch.module_name(layer, "qkv"), "output")]
    else:
        outs = [HookPoint(arch.module_name(layer, w), "output") for w in "qk"]
    with hooks.capture(model, [inp, *outs]) as cache:
        model(input_ids=ids)
    x = cache[inp][0]
    n_heads = model.config.num_attention_heads
    for which in "qk":
        view = arch.attn_head_view(model, layer, which)
        mine = torch.einsum("hed,td->the", view, x)  # (T, heads, d_head)
        d_head = view.shape[1]
        if model_type == "gpt2":
            d = x.shape[-1]
            ref = cache[outs[0]][0][:, "qk".index(which) * d:("qk".index(which) + 1) * d]
            ref = ref.view(-1, n_heads, d_head)
        elif model_type == "gpt_neox":
            ref = cache[outs[0]][0].view(-1, n_heads, 3, d_head)[:, :, "qk".index(which)]
        else:
            ref = cache[outs["qk".index(which)]][0].view(-1, view.shape[0], d_head)
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_sparse_mask_has_exact_fraction_and_only_allowed_matrices(handles, model_type):
    handle = handles[model_type]
    mp, nmp = synthetic(handle, n=2)
    objective = ContrastiveObjective.build(handle.model, paragraph_tensor(mp),
                                           paragraph_tensor(nmp), prefix_len=P)
    allowed = {s.name for s in weight_slots(handle)}
    assert not any(("bias" in n or "ln" in n or "norm" in n or "wte" in n or "embed" in n)
                   for n in allowed)
    n_total = sum(s.param.numel() for s in weight_slots(handle))
    for method in ("sparse", "random"):
        mask = gradient_mask(handle, objective, fraction=0.001, method=method)
        assert set(mask.masks) == allowed
        assert mask.n_total == n_total
        assert mask.n_selected == round(0.001 * n_total)
        assert sum(int(m.sum()) for m in mask.masks.values()) == mask.n_selected
    # The sparse mask holds the largest |∇CO| entries.
    from memlens.memorization.attribute import gradients

    grads = gradients(handle, lambda m: objective(m)[0])
    mask = gradient_mask(handle, objective, fraction=0.001)
    inside = torch.cat([grads[n].abs()[m] for n, m in mask.masks.items()])
    outside = torch.cat([grads[n].abs()[~m] for n, m in mask.masks.items()])
    assert inside.min() >= outside.max()


def test_sparse_update_touches_only_masked_entries_and_undo_is_bit_exact(handles):
    handle = handles["gpt2"]
    mp, nmp = synthetic(handle, n=2)
    objective = ContrastiveObjective.build(handle.model, paragraph_tensor(mp),
                                           paragraph_tensor(nmp), prefix_len=P)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    fingerprint = handle.fingerprint(refresh=True)
    mask = gradient_mask(handle, objective, fraction=0.01)
    edit, log = sparse_update(handle, objective, mask, lr=1e-2, steps=3, weight_decay=1.0)
    assert len(log) == 3
    state = handle.model.state_dict()
    changed = 0
    for name, value in state.items():
        diff = value != before[name]
        if name in mask.masks:
            assert not (diff & ~mask.masks[name]).any(), name
            changed += int(diff.sum())
        else:
            assert not diff.any(), name
    assert changed > 0.9 * mask.n_selected
    edit.undo()
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())
    assert handle.fingerprint() == fingerprint


def test_unlearning_synthetic_memorization_lowers_mp_em_more_than_nmp(handles):
    handle = handles["gpt_neo"]
    mp, nmp = synthetic(handle)
    state = {k: v.clone() for k, v in handle.model.state_dict().items()}
    result = run_update(handle, paragraph_tensor(mp), paragraph_tensor(nmp), prefix_len=P,
                        method="sparse", fraction=0.01, lr=1e-2, steps=5, keep=False)
    assert result.after["mp_em"] < result.before["mp_em"]
    assert abs(result.after["nmp_em"] - result.before["nmp_em"]) < (
        result.before["mp_em"] - result.after["mp_em"])
    assert all(torch.equal(v, state[k]) for k, v in handle.model.state_dict().items())


def test_compare_methods_measures_the_start_once_and_keeps_only_the_kept_edit(handles,
                                                                            monkeypatch):
    import memlens.memorization.sparse as sparse

    handle = handles["gpt2"]
    mp, nmp = synthetic(handle)
    state = {k: v.clone() for k, v in handle.model.state_dict().items()}
    calls = []
    real_measure = sparse.measure
    monkeypatch.setattr(sparse, "measure", lambda *a, **k: calls.append(1) or real_measure(*a, **k))
    results = sparse.compare_methods(handle, paragraph_tensor(mp), paragraph_tensor(nmp),
                                     keep="sparse", prefix_len=P, fraction=0.01, lr=1e-2, steps=2)
    assert [r.method for r in results] == ["sparse", "random", "full"]
    assert len(calls) == 1 + 3  # the start once, then after each method
    assert all(r.before == results[0].before for r in results)
    assert results[0].edit is not None and handle.model.state_dict().keys() == state.keys()
    assert any(not torch.equal(v, state[k]) for k, v in handle.model.state_dict().items())
    results[0].edit.undo()
    assert all(torch.equal(v, state[k]) for k, v in handle.model.state_dict().items())


def test_contrastive_keep_is_zero_before_any_update(handles):
    handle = handles["llama"]
    mp, nmp = synthetic(handle, n=2)
    co = ContrastiveObjective.build(handle.model, paragraph_tensor(mp), paragraph_tensor(nmp),
                                    prefix_len=P)
    loss, parts = co(handle.model)
    assert parts["keep"] == pytest.approx(0.0, abs=1e-5)
    assert parts["change_nll"] > 0 and parts["loss"] == pytest.approx(-0.1 * parts["change_nll"],
                                                                     abs=1e-4)


def test_perturb_swaps_one_token_per_variant(handles):
    handle = handles["gpt2"]
    mp, _ = synthetic(handle, n=2)
    ids = paragraph_tensor(mp)
    result = perturb(handle, mp, prefix_len=P)
    assert result.em_drop.shape == (2, P - 1) and result.positions == list(range(1, P))
    assert (result.swaps != ids[:, 1:P]).all()
    for i, pos in enumerate(result.pmp_position):
        differs = (result.pmp_ids[i, :P] != ids[i, :P]).nonzero()[:, 0].tolist()
        assert differs == [pos]
    # Model mode: 2nd choice where the original token was the model's 1st choice.
    logits = handle.model(input_ids=ids).logits
    swaps = swap_tokens(handle.model, ids, [3], "model")
    top2 = logits[:, 2].topk(2).indices
    for i in range(2):
        expected = top2[i, 1] if top2[i, 0] == ids[i, 3] else top2[i, 0]
        assert swaps[i, 0] == expected
    with pytest.raises(ValueError, match="position 0"):
        perturb(handle, mp, prefix_len=P, positions=[0])


def test_kendall_tau_and_dense_rank():
    assert kendall_tau(torch.tensor([1., 2, 3, 4]), torch.tensor([1., 3, 2, 4])) == \
        pytest.approx(4 / 6)
    assert kendall_tau(torch.tensor([1., 1, 2]), torch.tensor([1., 2, 3])) == \
        pytest.approx(2 / 6 ** 0.5)
    assert kendall_tau(torch.tensor([1., 2, 3]), torch.tensor([3., 2, 1])) == pytest.approx(-1)
    assert kendall_tau(torch.tensor([1., 1]), torch.tensor([1., 2])) == 0.0
    assert dense_rank(torch.tensor([5, 1, 5, 3])).tolist() == [2, 0, 2, 1]


def test_heads_and_kq_scores_match_eager_attention(handles):
    handle = handles["gpt2"]  # sdpa by default: heads must switch to eager and back
    mp, nmp = synthetic(handle, n=3)
    ids = paragraph_tensor(mp + nmp)
    freqs = torch.arange(handle.model.config.vocab_size)  # frequency = token id
    result = head_analysis(handle, ids, prefix_len=P, frequencies=freqs)
    assert result.tau.shape == (handle.n_layers, handle.n_heads)
    assert (result.tau.abs() <= 1).all() and (result.rare_mass <= 1 + 1e-5).all()
    assert result.tau[result.candidate] == result.tau.min()
    assert handle.model.config._attn_implementation == "sdpa"
    attention = prefix_attention(handle, ids, P)
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5)
    # With zero attention biases, softmax of the KQ scores is the model's attention pattern.
    from memlens.testing import random_model

    model, _ = random_model("gpt_neo")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention" in name and name.endswith("bias"):
                p.zero_()
    from memlens.arch import adapter_for
    from memlens.model import ModelHandle

    neo = ModelHandle(model, None, adapter_for(model), "random")
    scores = kq_scores(neo, ids[0], layer=0, head=1)
    with torch.no_grad():
        pattern = model(input_ids=ids[:1], output_attentions=True).attentions[0][0, 1]
    # GPT-Neo does not scale by √d_head: undo memlens' scaling before comparing.
    d_head = model.config.hidden_size // model.config.num_heads
    torch.testing.assert_close(torch.softmax(scores * d_head ** 0.5, -1), pattern,
                               rtol=1e-4, atol=1e-5)
    assert torch.isinf(scores.triu(1)[0, 1:]).all()


def test_run_all_writes_summary_and_figures(handles, tmp_path):
    handle = handles["gpt_neo"]
    mp, nmp = synthetic(handle, n=3)
    state = {k: v.clone() for k, v in handle.model.state_dict().items()}
    settings = Settings(prefix_len=P, nmp_max_em=2, lr=1e-2, steps=2, fraction=0.01,
                        progress=False)
    summary = run_all(handle, mp + nmp, tmp_path, settings)
    assert summary["scan"]["n_mp"] == 3 and summary["scan"]["n_nmp"] == 3
    assert set(summary["unlearn"]) == {"sparse", "random", "full"}
    for name in ("summary.json", "scan.png", "perturb.png", "attribution.png", "heads.png",
                 "kq.png", "unlearn.png", "edit.png", "pmp.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert all(torch.equal(v, state[k]) for k, v in handle.model.state_dict().items())


def test_plots_without_a_path_return_the_figure(handles, tmp_path, monkeypatch):
    """Notebooks: a plot function called without a path returns the Figure (not kept open by
    pyplot) and writes nothing; with a path it writes the file and returns the path."""
    from matplotlib.figure import Figure

    from memlens.figures import pyplot
    from memlens.memorization.plots import plot_scan

    monkeypatch.chdir(tmp_path)
    handle = handles["gpt2"]
    mp, nmp = synthetic(handle, n=2)
    result = scan(handle, mp + nmp, prefix_len=P, nmp_max_em=2)
    open_before = set(pyplot().get_fignums())
    fig = plot_scan(result)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert set(pyplot().get_fignums()) == open_before and not list(tmp_path.iterdir())
    assert plot_scan(result, tmp_path / "scan.png") == tmp_path / "scan.png"
    assert (tmp_path / "scan.png").stat().st_size > 0


def test_save_model_never_overwrites_and_keeps_the_edit_log(handles, tmp_path):
    handle = handles["gpt2"]
    mp, nmp = synthetic(handle, n=2)
    result = run_update(handle, paragraph_tensor(mp), paragraph_tensor(nmp), prefix_len=P,
                        fraction=0.01, lr=1e-2, steps=1)
    try:
        with pytest.raises(MemlensError, match="source model"):
            save_model(handle, handle.source_dir, result.edit)
        target = save_model(handle, tmp_path / "edited", result.edit)
        log = json.loads((target / "edit_log.json").read_text())
        assert log["edits"][0]["method"] == "memorization-unlearn"
        with pytest.raises(MemlensError, match="not an empty"):
            save_model(handle, target, result.edit)
    finally:
        result.edit.undo()


# ── the `tiny` organism (built once per run; ~1 min the first time) ─────────────────────────


@pytest.fixture(scope="module")
def tiny_split(tiny_handle):
    paragraphs = load_paragraphs(tiny_handle)
    result = scan(tiny_handle, paragraphs)
    return paragraphs, result


@pytest.mark.slow
def test_tiny_scan_separates_repeated_paragraphs(tiny_split):
    paragraphs, result = tiny_split
    table = {row["repeats"]: row for row in result.table()}
    most, least = max(table), min(table)
    assert table[most]["MP"] >= 1, table
    assert table[least]["MP"] == 0 and table[least]["NMP"] >= 1, table
    assert table[most]["mean_em"] > table[least]["mean_em"]


@pytest.mark.slow
def test_tiny_unlearning_lowers_mp_em_more_than_nmp(tiny_handle, tiny_split):
    paragraphs, result = tiny_split
    mp, nmp = result.split(paragraphs)
    state = {k: v.clone() for k, v in tiny_handle.model.state_dict().items()}
    update = run_update(tiny_handle, paragraph_tensor(mp), paragraph_tensor(nmp),
                        method="sparse", lr=1e-1, steps=10, keep=False)
    mp_drop = update.before["mp_em"] - update.after["mp_em"]
    assert mp_drop > 0, update.after
    assert abs(update.after["nmp_em"] - update.before["nmp_em"]) < mp_drop
    assert all(torch.equal(v, state[k]) for k, v in tiny_handle.model.state_dict().items())
