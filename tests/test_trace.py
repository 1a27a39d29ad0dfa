"""Causal tracing: the fast algorithm equals the naive one on every architecture; the runs,
noise, severed paths, averages, figures and CLI behave as ROME §2 says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlens.errors import MemlensError, SubjectNotFound
from memlens.model import ModelHandle
from memlens.trace import (
    ALL_KINDS,
    GROUPS,
    average_trace,
    best_layer,
    noise_scale,
    severed_trace,
    trace_fact,
)
from memlens.trace.average import load_facts, select_facts, token_groups
from memlens.trace.noise import NoiseSpec, draw_noise, resolve_noise
from memlens.trace.reference import naive_trace, patched_probability
from memlens.trace.runs import MIN_RELATIVE_EFFECT, NoCausalEffect, TraceResult
from memlens.trace.sites import trace_inputs, window_layers

PROMPT = "Miles Davis plays"  # 9 tiny-tokenizer tokens; "Davis" is tokens 3..5
SUBJECT = "Davis"
FAST = dict(samples=2, noise=1.0, window=2, seed=1)
COMPARED = [2, 3, 4, 5, 8]  # the naive loop is slow: one token before the subject, the subject, the last


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_handle(random_handle, sharp) -> ModelHandle:
    """``sharp`` (conftest) of ``random_handle``'s architecture (so: every architecture)."""
    return sharp(random_handle.arch.model_type)


def test_fast_equals_naive_every_kind(sharp_handle):
    fast = trace_fact(sharp_handle, PROMPT, SUBJECT, kinds=ALL_KINDS, **FAST)
    slow = naive_trace(sharp_handle, PROMPT, SUBJECT, kinds=ALL_KINDS, positions=COMPARED,
                       **FAST)
    assert fast.subject_range == (3, 6)
    assert fast.subject_range == slow.subject_range and fast.answer_id == slow.answer_id
    assert fast.p_corrupted == pytest.approx(slow.p_corrupted, abs=1e-5)
    assert fast.p_clean == pytest.approx(slow.p_clean, abs=1e-5)
    for kind in ALL_KINDS:
        assert fast.scores[kind].shape == (len(fast.tokens), sharp_handle.n_layers)
        # the comparison is meaningful only if restorations change the score
        assert np.ptp(slow.scores[kind][COMPARED]) > 1e-3, kind
        np.testing.assert_allclose(fast.scores[kind][COMPARED], slow.scores[kind][COMPARED],
                                   atol=1e-5, err_msg=kind)


def test_fast_equals_naive_float32(random_handle):
    kw = dict(kinds=("hidden", "mlp"), samples=2, noise=2.0, window=3)
    fast = trace_fact(random_handle, PROMPT, SUBJECT, **kw)
    slow = naive_trace(random_handle, PROMPT, SUBJECT, positions=[5, 8], **kw)
    for kind in kw["kinds"]:
        np.testing.assert_allclose(fast.scores[kind][[5, 8]], slow.scores[kind][[5, 8]],
                                   atol=1e-5)


def test_prefix_cache_is_kept_once_per_sample_and_never_grows(random_handle, monkeypatch):
    """The restored passes read the corrupted prefix's KV cache without storing anything:
    every cache layer keeps one row per noise sample and the prefix's length (a stored cache
    would hold one row per restoration and the suffix too), and no patched update stays."""
    import memlens.trace.fast as fast

    caches: list[tuple[int, object]] = []
    build = fast._corrupted_prefix_cache

    def recording(handle, inp, token):
        past = build(handle, inp, token)
        caches.append((token, past))
        return past

    monkeypatch.setattr(fast, "_corrupted_prefix_cache", recording)
    trace_fact(random_handle, PROMPT, SUBJECT, kinds=("hidden", "mlp"), samples=2, noise=2.0,
               window=3)
    assert len([past for _, past in caches if past is not None]) >= 5
    for token, past in caches:
        for layer in [] if past is None else past.layers:
            assert tuple(layer.keys.shape[:1]) == (2,) and layer.keys.shape[-2] == token
            assert "update" not in vars(layer)


def test_restoring_everything_gives_clean_run(sharp_handle):
    inp = trace_inputs(sharp_handle, PROMPT, SUBJECT, samples=2, noise=1.0)
    T, L = inp.n_tokens, sharp_handle.n_layers
    all_sites = [(t, ("hidden", layer)) for t in range(T) for layer in range(L)]
    assert patched_probability(sharp_handle, inp, restore=all_sites) == \
        pytest.approx(inp.p_clean, abs=1e-6)
    assert abs(patched_probability(sharp_handle, inp) - inp.p_clean) > 1e-3
    result = trace_fact(sharp_handle, PROMPT, SUBJECT, kinds=("hidden",), samples=2, noise=1.0)
    # the last block's output at the last token fixes the logits
    assert result.scores["hidden"][T - 1, L - 1] == pytest.approx(result.p_clean, abs=1e-6)
    # tokens before the subject are untouched by the noise: restoring them changes nothing
    assert np.allclose(result.scores["hidden"][: result.subject_range[0]], result.p_corrupted)


def test_severed_runs_differ_where_they_must(sharp_handle):
    result = severed_trace(sharp_handle, PROMPT, SUBJECT, samples=2, noise=1.0)
    hidden, L = result.scores["hidden"], sharp_handle.n_layers
    first, end = result.subject_range
    for kind in ("severed_mlp", "severed_attn"):
        severed = result.scores[kind]
        # at the last layer nothing downstream is frozen; before the subject nothing is noisy
        np.testing.assert_allclose(severed[:, L - 1], hidden[:, L - 1], atol=1e-6)
        np.testing.assert_allclose(severed[:first], hidden[:first], atol=1e-6)
        # at subject tokens, below the last layer, freezing changes the result
        assert np.abs(severed[first:end, : L - 1] - hidden[first:end, : L - 1]).max() > 1e-4


def test_subject_not_in_prompt(random_handle):
    with pytest.raises(SubjectNotFound, match="Paris"):
        trace_fact(random_handle, PROMPT, "Paris")
    with pytest.raises(MemlensError, match="unknown trace kind"):
        trace_fact(random_handle, PROMPT, SUBJECT, kinds=("mlps",))


def test_window_matches_reference():
    assert window_layers(0, 48, 10) == range(0, 5)
    assert window_layers(10, 48, 10) == range(5, 15)
    assert window_layers(47, 48, 10) == range(42, 48)
    assert window_layers(2, 4, 1) == range(2, 3)


def test_noise(random_handle):
    subjects = ["Miles Davis", "Tokyo"]
    ids = [i for s in subjects for i in random_handle.tokenizer(s)["input_ids"]]
    embedded = random_handle.arch.embedding(random_handle.model).weight[ids].double()
    assert noise_scale(random_handle, subjects) == pytest.approx(3 * embedded.std().item())
    spec = NoiseSpec(0.5, "uniform")
    eps = draw_noise(spec, 4, 2, 8, seed=0)
    assert eps.abs().max() <= 0.5 and eps.shape == (4, 2, 8)
    assert torch.equal(eps, draw_noise(spec, 4, 2, 8, seed=0))
    assert not torch.equal(eps, draw_noise(spec, 4, 2, 8, seed=1))
    assert resolve_noise(random_handle, "uniform:0.2") == NoiseSpec(0.2, "uniform")
    assert resolve_noise(random_handle, 0.3) == NoiseSpec(0.3, "gaussian")
    with pytest.raises(MemlensError, match="positive"):
        resolve_noise(random_handle, -1.0)


def test_noise_scale_does_not_depend_on_the_thread_count(random_handle):
    """ν enters every trace cache key: a run with another thread count must find the records."""
    subjects = ["Miles Davis", "Tokyo", "Toulouse", "Paris"] * 400  # > torch's parallel grain
    threads = torch.get_num_threads()
    try:
        scales = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            scales.add(noise_scale(random_handle, subjects))
    finally:
        torch.set_num_threads(threads)
    assert len(scales) == 1


def test_best_layer_and_positions(sharp_handle):
    result = trace_fact(sharp_handle, PROMPT, SUBJECT, kinds=("mlp",), positions=[1], **FAST)
    assert np.isnan(result.scores["mlp"][0]).all() and not np.isnan(result.scores["mlp"][1]).any()
    last = result.subject_range[1] - 1
    full = trace_fact(sharp_handle, PROMPT, SUBJECT, kinds=("mlp",), **FAST)
    reachable = sharp_handle.n_layers - 1  # "Davis" ends before the last token: not layer L-1
    effects = full.scores["mlp"][last][:reachable] - full.p_corrupted
    if effects.max() > MIN_RELATIVE_EFFECT * full.p_clean:
        assert best_layer(sharp_handle, PROMPT, SUBJECT, **FAST) == int(np.argmax(effects))
    else:  # no reachable layer brings the answer back: best_layer says so instead of guessing
        with pytest.raises(NoCausalEffect):
            best_layer(sharp_handle, PROMPT, SUBJECT, **FAST)


def test_json_round_trip(random_handle, tmp_path):
    result = trace_fact(random_handle, PROMPT, SUBJECT, kinds=("attn",), positions=[0], **FAST)
    data = json.loads(result.save(tmp_path / "trace.json").read_text())
    for key in ("tokens", "subject_range", "answer", "p_clean", "p_corrupted"):
        assert key in data
    assert data["scores"]["attn"][1][0] is None  # untraced position
    back = TraceResult.from_json(data)
    np.testing.assert_array_equal(back.scores["attn"], result.scores["attn"])


def test_token_groups():
    groups = token_groups(7, (1, 4))
    assert groups == {"first_subject": [1], "middle_subject": [2], "last_subject": [3],
                      "first_subsequent": [4], "further": [5], "last": [6]}
    assert token_groups(3, (0, 1))["last_subject"] == [0]
    assert token_groups(3, (0, 3))["first_subsequent"] == []


def test_average_trace_skips_and_resumes(tmp_path, sharp):
    handle = sharp("gpt2")
    known = "Apple was founded by"  # this model's top next token there is "gu"
    assert handle.tokenizer.decode([int(handle.logits([known])[0, -1].argmax())]) == "gu"
    facts = [
        {"prompt": known, "subject": "Apple", "attribute": "gu"},
        {"prompt": "The capital of {} is", "subject": "Japan"},
        {"prompt": PROMPT, "subject": "Paris"},
        {"prompt": known, "subject": "Apple", "attribute": "Tokyo"},
    ]
    resume = tmp_path / "cases.jsonl"
    kw = dict(kinds=("hidden", "mlp"), samples=2, noise=1.0, progress=False, resume=resume)
    avg = average_trace(handle, facts, **kw)
    assert (avg.n_facts, avg.n_skipped_invalid, avg.n_skipped_wrong) == (2, 1, 1)
    assert avg.aie["mlp"].shape == (len(GROUPS), handle.n_layers)
    single = trace_fact(handle, known, "Apple", kinds=("hidden",), samples=2, noise=1.0)
    other = trace_fact(handle, "The capital of Japan is", "Japan", kinds=("hidden",),
                       samples=2, noise=1.0)
    expected = (single.indirect_effect("hidden")[-1] + other.indirect_effect("hidden")[-1]) / 2
    np.testing.assert_allclose(avg.effect("hidden", "last"), expected, atol=1e-6)
    assert avg.ate == pytest.approx((single.total_effect + other.total_effect) / 2)
    site = avg.recall_site()
    assert set(site["aie_last_subject_token"]) == {"hidden", "mlp"} and site["n_skipped"] == 2
    assert len(resume.read_text().splitlines()) == 4
    again = average_trace(handle, facts, **kw)  # everything comes from the resume file
    assert len(resume.read_text().splitlines()) == 4
    np.testing.assert_array_equal(again.aie["mlp"], avg.aie["mlp"])


def test_load_facts_formats(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([
        {"known_id": 0, "subject": "Toulouse", "prompt": "Toulouse is in", "attribute": "France"},
        {"case_id": 1, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
                                             "target_true": {"str": "trumpet"}}},
    ]))
    assert load_facts(path) == [
        {"prompt": "Toulouse is in", "subject": "Toulouse", "attribute": "France"},
        {"prompt": "Miles Davis plays the", "subject": "Miles Davis", "attribute": "trumpet"},
    ]


def test_cli_trace_and_average(random_model_dirs, tmp_path):
    from typer.testing import CliRunner

    from memlens.cli import app

    runner = CliRunner()
    model = str(random_model_dirs["gpt2"])
    out = tmp_path / "trace"
    res = runner.invoke(app, ["trace", "--model", model, "--prompt", PROMPT, "--subject",
                              SUBJECT, "--samples", "2", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data == json.loads((out / "trace.json").read_text())
    assert set(data["scores"]) == {"hidden", "mlp", "attn"}
    for kind in ("hidden", "mlp", "attn"):
        assert (out / f"trace_{kind}.png").is_file() and (out / f"trace_{kind}.svg").is_file()
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": PROMPT, "subject": SUBJECT},
                                 {"prompt": PROMPT, "subject": "Paris"}]))
    avg_out = tmp_path / "avg"
    res = runner.invoke(app, ["trace-avg", "--model", model, "--facts", str(facts), "--kind",
                              "hidden", "--samples", "2", "--out", str(avg_out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((avg_out / "trace_avg.json").read_text())
    assert summary["n_facts"] == 1 and summary["n_skipped_invalid"] == 1
    assert (avg_out / "avg_lines.svg").is_file() and (avg_out / "avg_hidden.png").is_file()


def test_select_facts_filters_relations_and_spreads_evenly():
    facts = [{"prompt": f"p{i}", "subject": "s", "relation": "ab"[i // 6]} for i in range(12)]
    assert [f["prompt"] for f in select_facts(facts, 4)] == ["p0", "p3", "p6", "p9"]
    assert {f["relation"] for f in select_facts(facts, None, ["b"])} == {"b"}
    assert len(select_facts(facts, 100)) == 12
    with pytest.raises(MemlensError, match="the facts have: a, b"):
        select_facts(facts, None, ["c"])


def test_depth_scaled_window():
    from memlens.trace.sites import depth_scaled_window

    assert [depth_scaled_window(n) for n in (48, 28, 12, 6, 1)] == [10, 6, 2, 1, 1]


def test_default_window_is_the_papers_on_deep_models_and_scaled_on_shallow_ones(sharp_handle):
    from memlens.trace.sites import default_window

    assert [default_window(n) for n in (48, 28, 27, 12, 6)] == [10, 10, 6, 2, 1]
    result = trace_fact(sharp_handle, PROMPT, SUBJECT, kinds=("mlp",), samples=2)
    assert result.window == default_window(sharp_handle.n_layers)


def test_plots_without_a_directory_return_one_figure(gpt2, tmp_path, monkeypatch):
    """Notebooks: ``plot_trace(result)`` / ``plot_average(avg)`` return one matplotlib Figure
    (every kind side by side; heatmaps above the line plots), released from pyplot, and write
    nothing."""
    from matplotlib.figure import Figure

    from memlens.figures import pyplot
    from memlens.trace.plot import plot_average, plot_trace

    monkeypatch.chdir(tmp_path)
    open_before = set(pyplot().get_fignums())
    result = trace_fact(gpt2, PROMPT, SUBJECT, **FAST)
    fig = plot_trace(result)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * len(result.scores)  # + colorbars
    avg = average_trace(gpt2, [{"prompt": PROMPT, "subject": SUBJECT}], progress=False, **FAST)
    fig2 = plot_average(avg)
    assert isinstance(fig2, Figure) and len(fig2.axes) == 2 * len(avg.kinds) + 2
    assert set(pyplot().get_fignums()) == open_before
    fig2.savefig(tmp_path / "avg.png")  # still drawable
    assert [p.name for p in tmp_path.iterdir()] == ["avg.png"]
