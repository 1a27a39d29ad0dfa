"""The δ optimisation (memlens.edit.optimize / passes) against the reference loop that the MEMIT
benchmark times: one fact after another, whole-model passes. The fast path — facts batched,
only the suffix above the point, KL prompts in a one-column pass of their own, the last block's
MLP only where the loss reads, fused GELU and eager attention — must give the same δ, losses
and steps up to float rounding, also for facts that stop early."""

from __future__ import annotations

import pytest
import torch

from memlens.edit import EditRequest
from memlens.edit.keys import fact_token_reads
from memlens.edit.optimize import DeltaObjective, _chunks, _fact_rows, optimize_deltas
from memlens.edit.passes import FullPasses, SuffixPasses, fast_kernels
from memlens.tokens import answer_ids

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")

REQUESTS = [EditRequest("{} is a city in", "Toulouse", "Japan"),
            EditRequest("{} plays the", "Miles Davis", "Paris"),
            EditRequest("The capital of {} is", "Japan", "Apple"),
            EditRequest("{} was founded by", "Apple", "Steve Jobs"),
            EditRequest("{} is", "Japan", "Apple")]
TEMPLATES = ["{}", "The capital. {}", "Miles Davis plays the piano. {}"]


@pytest.fixture(scope="module")
def llama(random_model_dirs):
    from memlens.model import load_model

    return load_model(str(random_model_dirs["llama"]), device="cpu")


def targets_of(handle, requests):
    return [answer_ids(handle.tokenizer, r.text, r.target_new) for r in requests]


def reference_loop(handle, point, requests, targets, templates, h0, objective):
    """What benchmarks/bench_memit.py times: each fact alone, the whole model every step."""
    alone = [optimize_deltas(handle, point, [r], [t], templates, h0[i: i + 1], objective,
                             max_batch_tokens=0, suffix_only=False)
             for i, (r, t) in enumerate(zip(requests, targets, strict=True))]
    return (torch.cat([a.delta for a in alone]), [a.steps[0] for a in alone],
            [a.loss_last[0] for a in alone])


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_fast_path_equals_the_reference_loop_and_early_stops_keep_trajectories(model, request):
    handle = request.getfixturevalue(model)
    requests = REQUESTS * 2
    point = "blocks.1.hook_resid_post"  # blocks 2 and 3 run, the top one MLP-restricted
    h0 = fact_token_reads(handle, requests, ["{}"], "last", {point: "bare"})[point]
    targets = targets_of(handle, requests)
    # a stop loss between the facts' losses: some facts stop after a few steps, some run on
    objective = DeltaObjective(fact_token="last", weight_decay=0.0, clamp_norm_factor=50.0,
                               steps=8, stop_loss=0.0)
    unstopped = optimize_deltas(handle, point, requests, targets, TEMPLATES, h0, objective)
    objective = DeltaObjective(fact_token="last", weight_decay=0.0, clamp_norm_factor=50.0,
                               steps=8, stop_loss=float(torch.tensor(unstopped.loss_last).median()))
    fast = optimize_deltas(handle, point, requests, targets, TEMPLATES, h0, objective)
    delta, steps, loss_last = reference_loop(handle, point, requests, targets, TEMPLATES, h0,
                                             objective)
    assert fast.steps == steps
    assert min(steps) < objective.steps == max(steps)  # some stopped early, some did not
    torch.testing.assert_close(fast.delta, delta, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(fast.loss_last), torch.tensor(loss_last),
                               atol=1e-4, rtol=1e-4)
    assert fast.delta.abs().max() > 0


def test_top_mlp_on_read_entries_and_kl_rows_cut_change_nothing(gpt2):
    handle, point = gpt2, "blocks.0.hook_resid_post"
    objective = DeltaObjective()
    facts = [_fact_rows(handle.tokenizer, r, t, TEMPLATES, objective)
             for r, t in zip(REQUESTS, targets_of(handle, REQUESTS), strict=True)]
    rows = [r for f in facts for r in f.rows]
    lookups = [p for f in facts for p in f.lookups]
    suffix, whole = SuffixPasses(handle, point, rows, lookups), FullPasses(handle, point, rows,
                                                                           lookups)
    every = torch.arange(len(rows))
    read = (every, torch.tensor([len(f) - 1 - p for f, p in zip(rows, lookups, strict=True)]))

    def nothing(out):
        return out

    restricted = suffix.run(every, nothing, read=read)
    full = whole.run(every, nothing)
    torch.testing.assert_close(restricted[read], full[every, torch.tensor(
        [len(f) - 1 for f in rows])], atol=1e-5, rtol=1e-4)
    # a KL prompt cut after its fact token: the same output there
    kl = SuffixPasses(handle, point, [f.kl_row[:f.kl_lookup + 1] for f in facts],
                      [f.kl_lookup for f in facts])
    kl_whole = FullPasses(handle, point, [f.kl_row for f in facts], [f.kl_lookup for f in facts])
    n = torch.arange(len(facts))
    torch.testing.assert_close(kl.run(n, nothing)[n, 0], kl_whole.run(n, nothing)[
        n, torch.tensor([f.kl_lookup for f in facts])], atol=1e-5, rtol=1e-4)


def test_fast_kernels_compute_the_same_and_restore_the_model(gpt2):
    model = gpt2.model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = model(input_ids=ids).logits
    implementation = model.config._attn_implementation
    acts = [m for m in model.modules() if type(m).__name__ == "NewGELUActivation"]
    with fast_kernels(model):
        inside = model(input_ids=ids).logits
        assert all("forward" in m.__dict__ for m in acts)
    assert model.config._attn_implementation == implementation
    assert all("forward" not in m.__dict__ for m in acts)
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-4)
    assert torch.equal(model(input_ids=ids).logits, before)


def test_suffix_passes_group_facts_of_one_width(gpt2):
    objective = DeltaObjective()
    facts = [_fact_rows(gpt2.tokenizer, r, t, TEMPLATES, objective)
             for r, t in zip(REQUESTS * 3, targets_of(gpt2, REQUESTS * 3), strict=True)]

    def width(f):
        return {len(r) - p for r, p in zip(f.rows, f.lookups, strict=True)}

    groups = _chunks(facts, 4096, suffix_only=True)
    assert sorted(i for g in groups for i in g) == list(range(len(facts)))
    for group in groups:
        assert len({max(width(facts[i])) for i in group}) == 1
