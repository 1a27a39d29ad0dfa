"""Foundation: loading, adapters, the edited-matrix accessor, hooks, subject spans, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memlens import hooks
from memlens.errors import (
    EmptyInput,
    HubUnreachable,
    ModelNotFound,
    SubjectNotFound,
    UnknownArchitecture,
)
from memlens.model import load_model
from memlens.tokens import subject_span

PROMPT = "The Eiffel Tower is located in"


def test_adapter_paths_resolve(random_handle):
    model, arch = random_handle.model, random_handle.arch
    for layer in range(random_handle.n_layers):
        for component in ("block", "attn", "mlp", "mlp_in", "mlp_act", "mlp_out", "o", "ln_attn"):
            model.get_submodule(arch.module_name(layer, component))
    for path in (arch.spec.embed, arch.spec.final_norm, arch.spec.unembed):
        model.get_submodule(path)
    assert random_handle.n_layers == 4
    assert random_handle.d_model == 64
    assert random_handle.d_ff == 128
    assert random_handle.n_heads == 4


def test_edit_weight_round_trips_bit_exact(random_handle):
    model, arch = random_handle.model, random_handle.arch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = arch.get_edit_weight(model, 2)
    assert weight.shape == (random_handle.d_model, random_handle.d_ff)
    arch.set_edit_weight(model, 2, weight)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_edit_weight_is_the_map_from_keys_to_mlp_output(random_handle):
    """v = W k + b: the accessor's orientation matches what the MLP computes."""
    model, arch = random_handle.model, random_handle.arch
    ids = random_handle.encode([PROMPT]).input_ids
    with hooks.capture(model, ["blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"]) as cache:
        model(ids)
    keys, out = cache["blocks.1.mlp.hook_post"], cache["blocks.1.hook_mlp_out"]
    bias = getattr(model.get_submodule(arch.module_name(1, "mlp_out")), "bias", None)
    expected = keys @ arch.get_edit_weight(model, 1).T + (0 if bias is None else bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_set_edit_weight_rejects_wrong_shape(random_handle):
    arch = random_handle.arch
    with pytest.raises(ValueError, match="d_model, d_ff"):
        arch.set_edit_weight(random_handle.model, 0, torch.zeros(3, 3))


def test_block_outputs_through_hooks_equal_hidden_states(random_handle):
    model = random_handle.model
    ids = random_handle.encode([PROMPT]).input_ids
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(random_handle.n_layers)]
    with torch.no_grad(), hooks.capture(model, names) as cache:
        out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states
    for layer in range(random_handle.n_layers - 1):
        torch.testing.assert_close(cache[names[layer]], hidden[layer + 1])
    final_norm = random_handle.arch.final_norm(model)
    torch.testing.assert_close(final_norm(cache[names[-1]]), hidden[-1])


def test_adding_to_one_mlp_output_changes_only_that_position_and_later(random_handle):
    model = random_handle.model
    ids = random_handle.encode([PROMPT]).input_ids
    position = 3
    with torch.no_grad():
        clean = model(ids).logits
        vector = torch.randn(random_handle.d_model, generator=torch.Generator().manual_seed(0))
        with hooks.add(model, "blocks.1.hook_mlp_out", vector * 10, positions=[position]):
            steered = model(ids).logits
    assert torch.equal(clean[:, :position], steered[:, :position])
    assert (clean[:, position:] - steered[:, position:]).abs().amax(-1).min() > 0


def test_hooks_are_removed_when_the_forward_pass_raises(random_handle):
    model = random_handle.model
    block = model.get_submodule(random_handle.arch.module_name(0, "block"))
    before = (len(block._forward_hooks), len(block._forward_pre_hooks))

    def boom(tensor):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooks.edit(model, "blocks.0.hook_resid_post", boom):
        model(random_handle.encode([PROMPT]).input_ids)
    assert (len(block._forward_hooks), len(block._forward_pre_hooks)) == before


def test_input_hook_replaces_block_input(random_handle):
    model = random_handle.model
    ids = random_handle.encode([PROMPT]).input_ids
    with torch.no_grad(), hooks.capture(model, ["blocks.1.hook_resid_post"]) as cache:
        model(ids)
    zero = torch.zeros(random_handle.d_model)
    with torch.no_grad(), hooks.replace(model, "blocks.2.hook_resid_pre", zero), \
            hooks.capture(model, ["blocks.2.hook_resid_pre"]) as seen:
        model(ids)
    assert torch.count_nonzero(seen["blocks.2.hook_resid_pre"]) == 0
    assert torch.count_nonzero(cache["blocks.1.hook_resid_post"]) > 0


def test_fingerprint_is_stable_and_tracks_weights(random_handle):
    first = random_handle.fingerprint(refresh=True)
    assert random_handle.fingerprint(refresh=True) == first
    weight = random_handle.arch.get_edit_weight(random_handle.model, 0)
    random_handle.arch.set_edit_weight(random_handle.model, 0, weight + 1)
    changed = random_handle.fingerprint(refresh=True)
    random_handle.arch.set_edit_weight(random_handle.model, 0, weight)
    assert changed != first
    assert random_handle.fingerprint(refresh=True) == first


@pytest.mark.parametrize(
    ("prompt", "subject", "expected_text"),
    [
        ("Toulouse is a city in", "Toulouse", "Toulouse"),
        ("The Eiffel Tower is located in", "Eiffel Tower", " Eiffel Tower"),
        ("The capital of Japan", "Japan", " Japan"),
        ("Paris, Paris and Paris again", "Paris", "Paris"),
        ("Miles Davis plays the", " Davis", " Davis"),
    ],
)
def test_subject_span(random_handle, prompt, subject, expected_text):
    tokenizer = random_handle.tokenizer
    span = subject_span(tokenizer, prompt, subject)
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids[span.start:span.end]).strip() == expected_text.strip()
    assert span.last == span.end - 1 >= span.first


def test_subject_span_occurrence(random_handle):
    tokenizer = random_handle.tokenizer
    first = subject_span(tokenizer, "Paris, Paris", "Paris")
    second = subject_span(tokenizer, "Paris, Paris", "Paris", occurrence=1)
    assert second.start > first.last


def test_subject_not_found_quotes_both(random_handle):
    with pytest.raises(SubjectNotFound, match="'Lyon'.*'Toulouse is a city in'"):
        subject_span(random_handle.tokenizer, "Toulouse is a city in", "Lyon")


def test_empty_prompt_is_an_error(random_handle):
    with pytest.raises(EmptyInput):
        subject_span(random_handle.tokenizer, "", "Lyon")
    with pytest.raises(EmptyInput):
        random_handle.encode(["ok", ""])


def test_unknown_architecture_names_how_to_register(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from memlens.arch import adapter_for

    config = AutoConfig.for_model("bloom", n_layer=1, hidden_size=16, n_head=2, vocab_size=50)
    with pytest.raises(UnknownArchitecture, match="register_architecture"):
        adapter_for(AutoModelForCausalLM.from_config(config))


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachable, match="organism:"):
        load_model("some-org/surely-not-cached-model")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelNotFound):
        load_model(str(tmp_path / "nope"))


def test_cli_info_json(random_model_dirs):
    from memlens.cli import app

    result = CliRunner().invoke(app, ["info", "--model", str(random_model_dirs["gpt2"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    for key in ("model_type", "n_layers", "n_heads", "d_model", "d_ff", "n_params",
                "edit_module_template"):
        assert key in info
    assert info["model_type"] == "gpt2"
    assert info["edit_module_template"] == "transformer.h.{}.mlp.c_proj"
    assert (info["n_layers"], info["d_model"], info["d_ff"]) == (4, 64, 128)


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "from memlens.cli import main; main()", "info", "--model",
         str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a model directory" in proc.stderr


def test_forwards_replaced_restores_class_and_instance_forwards_also_after_an_error():
    from torch import nn

    from memlens import hooks

    plain, patched = nn.Linear(2, 2), nn.Linear(2, 2)
    own = patched.forward  # an instance-level forward, as accelerate installs
    patched.forward = own
    x = torch.ones(1, 2)
    with pytest.raises(RuntimeError):
        with hooks.forwards_replaced([(plain, lambda t: t * 0), (patched, lambda t: t * 0)]):
            assert plain(x).abs().sum() == 0 and patched(x).abs().sum() == 0
            raise RuntimeError("inside")
    assert "forward" not in plain.__dict__ and patched.__dict__["forward"] is own
    torch.testing.assert_close(plain(x), nn.functional.linear(x, plain.weight, plain.bias))
