"""Attention knockout (Geva et al. 2023): blocking nothing is the clean run bit for bit, blocking
every edge into the last token makes it blind to earlier tokens, on every architecture under
eager and sdpa attention; results, averages, resume and CLI behave."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memlens.errors import InvalidArgument, MemlensError, SubjectNotFound
from memlens.knockout import (
    SOURCES,
    average_knockout,
    block_attention,
    cut_mask,
    default_knockout_window,
    knockout_fact,
    plot_knockout,
    source_positions,
)
from memlens.model import ModelHandle
from memlens.tokens import Span

PROMPT = "Miles Davis plays the trumpet"
SUBJECT = "Davis"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def sharp_handle(request, random_handle, sharp) -> ModelHandle:
    """``sharp`` (conftest) of ``random_handle``'s architecture, eager and sdpa: 7 × 2
    handles."""
    return sharp(random_handle.arch.model_type, request.param)


def _logits(handle: ModelHandle, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return handle.model(input_ids=ids, use_cache=False).logits


def test_blocking_nothing_is_the_clean_run_bit_for_bit(sharp_handle):
    ids = sharp_handle.encode([PROMPT]).input_ids
    T, L = ids.shape[1], sharp_handle.n_layers
    clean = _logits(sharp_handle, ids)
    with block_attention(sharp_handle, {}):
        assert torch.equal(_logits(sharp_handle, ids), clean)
    # every layer's mask rewritten, but with no edge removed
    nothing = {layer: torch.zeros(1, T, T, dtype=torch.bool) for layer in range(L)}
    with block_attention(sharp_handle, nothing):
        assert torch.equal(_logits(sharp_handle, ids), clean)
    assert torch.equal(_logits(sharp_handle, ids), clean)  # hooks are gone


def test_last_token_blind_to_earlier_tokens_when_all_its_edges_are_cut(sharp_handle):
    ids = sharp_handle.encode([PROMPT]).input_ids
    T, L = ids.shape[1], sharp_handle.n_layers
    other = ids.clone()
    other[0, :-1] = (ids[0, :-1] + 7) % 300  # every earlier token changed
    cut = torch.zeros(1, T, T, dtype=torch.bool)
    cut[0, T - 1, :T - 1] = True
    # the check can fail: without the knockout, or with one layer left open, the earlier
    # tokens reach the last position
    assert (_logits(sharp_handle, ids)[0, -1] - _logits(sharp_handle, other)[0, -1]
            ).abs().max() > 1e-3
    with block_attention(sharp_handle, {layer: cut for layer in range(1, L)}):
        assert (_logits(sharp_handle, ids)[0, -1] - _logits(sharp_handle, other)[0, -1]
                ).abs().max() > 1e-3
    with block_attention(sharp_handle, {layer: cut for layer in range(L)}):
        blind, blind_other = _logits(sharp_handle, ids), _logits(sharp_handle, other)
    torch.testing.assert_close(blind[0, -1], blind_other[0, -1], rtol=0, atol=1e-12)
    assert (blind[0, :-1] - blind_other[0, :-1]).abs().max() > 1e-3  # other rows untouched


def test_knockout_rows_equal_separate_runs(sharp_handle):
    result = knockout_fact(sharp_handle, PROMPT, SUBJECT, window=2, batch_size=5)
    ids = sharp_handle.encode([PROMPT]).input_ids
    T, L = ids.shape[1], sharp_handle.n_layers
    for source in SOURCES:
        for centre in (0, L - 1):
            cut = torch.zeros(1, T, T, dtype=torch.bool)
            cut[0, T - 1, result.sources[source]] = True
            layers = range(max(0, centre - 1), min(L, centre + 1))
            with block_attention(sharp_handle, {layer: cut for layer in layers}):
                p = torch.softmax(_logits(sharp_handle, ids)[0, -1], -1)[result.answer_id]
            assert result.p_blocked[source][centre] == pytest.approx(float(p), abs=1e-10)
    expected = (result.p_blocked["subject"] - result.p_clean) / result.p_clean
    np.testing.assert_allclose(result.relative["subject"], expected)


def test_source_sets_and_window():
    assert source_positions(6, Span(1, 3)) == {"subject": [1, 2], "non_subject": [0, 3, 4],
                                               "last": [5]}
    assert source_positions(3, Span(1, 3)) == {"subject": [1], "non_subject": [0],
                                               "last": [2]}
    assert source_positions(2, Span(0, 1))["non_subject"] == []
    assert [default_knockout_window(L) for L in (48, 28, 12, 6, 4)] == [9, 5, 2, 1, 1]


def test_empty_source_set_is_nan_and_result_round_trips(random_model_dirs):
    from memlens.knockout import KnockoutResult
    from memlens.model import load_model

    handle = load_model(str(random_model_dirs["gpt2"]), device="cpu")
    result = knockout_fact(handle, "Miles Davis", "Miles Davis")  # the subject ends the prompt
    assert np.isnan(result.p_blocked["non_subject"]).all()
    assert np.isfinite(result.p_blocked["subject"]).all()
    back = KnockoutResult.from_json(json.loads(json.dumps(result.to_json())))
    np.testing.assert_array_equal(back.relative["subject"], result.relative["subject"])
    assert plot_knockout(result).axes


def test_cut_mask_keeps_the_format():
    cut = torch.zeros(2, 3, 3, dtype=torch.bool)
    cut[1, 2, 0] = True
    as_bool = cut_mask(None, cut, "sdpa", torch.float32)
    assert as_bool.dtype == torch.bool and as_bool.shape == (2, 1, 3, 3)
    assert as_bool[0, 0].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not as_bool[1, 0, 2, 0] and as_bool[1, 0, 2, 1]
    additive = cut_mask(None, cut, "eager", torch.float32)
    low = torch.finfo(torch.float32).min
    assert additive[0, 0, 0, 1] == low and additive[0, 0, 2, 0] == 0
    assert additive[1, 0, 2, 0] == low
    padded = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    padded[..., 1] = False
    assert cut_mask(padded, cut, "sdpa", torch.float32)[0, 0, 2, 1].item() is False
    with pytest.raises(MemlensError, match="attention mask"):
        cut_mask(torch.zeros(1, 1, 4, 4), cut, "eager", torch.float32)


def test_refuses_other_attention_and_bad_input(random_handle):
    other = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flex_attention"),
                            arch=random_handle.arch, model=random_handle.model)
    with pytest.raises(InvalidArgument, match="eager and sdpa"):
        with block_attention(other, {0: torch.zeros(1, 2, 2, dtype=torch.bool)}):
            pass
    with pytest.raises(InvalidArgument, match="window"):
        knockout_fact(random_handle, PROMPT, SUBJECT, window=0)
    with pytest.raises(SubjectNotFound):
        knockout_fact(random_handle, PROMPT, "Coltrane")


# ── the tiny organism ───────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_facts(tiny_organism):
    from memlens.trace import load_facts, select_facts

    return select_facts(load_facts(tiny_organism / "known_facts.json"), 6)


def test_average_knockout_on_the_tiny_organism_and_resume(tiny_handle, tiny_facts, tmp_path,
                                                          monkeypatch):
    resume = tmp_path / "knockout.jsonl"
    avg = average_knockout(tiny_handle, tiny_facts, progress=False, resume=resume)
    assert avg.n_facts + avg.n_skipped_wrong + avg.n_skipped_invalid == len(tiny_facts)
    assert avg.n_facts >= 3
    assert avg.window == default_knockout_window(tiny_handle.n_layers)
    for source in ("subject", "last"):
        assert np.isfinite(avg.relative[source]).all()
        assert (avg.relative[source] >= -1).all()
    assert set(avg.strongest()) == set(SOURCES)
    json.dumps(avg.to_json())

    import memlens.knockout as knockout_module

    def no_recompute(*args, **kwargs):
        raise AssertionError("a resumed fact was computed again")

    monkeypatch.setattr(knockout_module, "knockout_fact", no_recompute)
    again = average_knockout(tiny_handle, tiny_facts, progress=False, resume=resume)
    np.testing.assert_array_equal(again.relative["subject"], avg.relative["subject"])


def test_cli_knockout_one_fact_and_average(random_model_dirs, tiny_organism, tmp_path):
    from memlens.cli import app

    runner = CliRunner()
    out = tmp_path / "one"
    res = runner.invoke(app, ["knockout", "--model", str(random_model_dirs["llama"]), "--prompt",
                              PROMPT, "--subject", SUBJECT, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "non-subject" in res.output
    data = json.loads((out / "knockout.json").read_text())
    assert set(data["relative"]) == set(SOURCES) and (out / "knockout.png").stat().st_size

    out = tmp_path / "avg"
    res = runner.invoke(app, ["knockout", "--model", str(tiny_organism), "--facts",
                              str(tiny_organism / "known_facts.json"), "--n", "3",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_facts"] >= 1
    assert (out / "knockout_avg.json").exists() and (out / "knockout_avg.png").exists()

    res = runner.invoke(app, ["knockout", "--model", str(random_model_dirs["gpt2"]),
                              "--prompt", PROMPT, "--out", str(tmp_path / "bad")])
    assert isinstance(res.exception, MemlensError)
    assert "--prompt and --subject together" in str(res.exception)
