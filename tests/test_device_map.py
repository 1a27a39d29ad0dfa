"""--device-map: models spread by accelerate over devices, with offloaded layers (issue 21).

On the CPU a device map that sends some blocks to "disk" makes accelerate's dispatch real:
those blocks' parameters stay on the meta device and an AlignDevicesHook loads them from the
checkpoint for each forward. Tracing, key statistics, ROME and MEMIT must give what they give
on the model loaded whole; the edits go into the offloaded weights map and undo exactly.
Tolerance: the mapped model runs the same float32 kernels on the same values, so results
agree to 1e-6 (they are in fact bit-identical today).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memlens.errors import InputFileError, InvalidArgument
from memlens.model import Placement, load_model, parse_device_map
from memlens.offload import OffloadedWeightError, offloaded, read_tensor

pytestmark = pytest.mark.usefixtures("isolated_home", "one_thread")

ATOL = 1e-6
TEMPLATES = ["{}", "The capital is located. {}"]
#: blocks 1 and 2 of the tiny GPT-2 offloaded to disk, the rest resident on the CPU
SPLIT = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
         "transformer.h.1": "disk", "transformer.h.2": "disk", "transformer.h.3": "cpu",
         "transformer.ln_f": "cpu", "lm_head": "cpu"}
W1 = "transformer.h.1.mlp.c_proj.weight"  # offloaded
W3 = "transformer.h.3.mlp.c_proj.weight"  # resident


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The tiny random GPT-2 (built here: the other architectures are not needed)."""
    from memlens.testing import random_model_dir

    return str(random_model_dir("gpt2", tmp_path_factory.mktemp("device-map")))


@pytest.fixture(scope="module")
def whole(ref):
    return load_model(ref, device="cpu")


def mapped(ref, tmp_path):
    return load_model(ref, device_map=SPLIT, offload_folder=tmp_path / "offload")


def test_parse_device_map(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map(" Sequential ") == "sequential"
    assert parse_device_map({"": "cpu"}) == {"": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(SPLIT))
    assert parse_device_map(path) == SPLIT
    assert parse_device_map('{"": "disk"}') == {"": "disk"}
    with pytest.raises(InvalidArgument, match="use auto, balanced"):
        parse_device_map("everywhere")
    with pytest.raises(InputFileError, match="does not exist"):
        parse_device_map(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        parse_device_map(tmp_path / "bad.json")
    with pytest.raises(InvalidArgument, match="non-empty JSON object"):
        parse_device_map("{}")
    with pytest.raises(InvalidArgument, match="unknown device 'gpu7'"):
        parse_device_map({"lm_head": "gpu7"})
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="0 CUDA device"):
            parse_device_map({"lm_head": "cuda:0"})


def test_bad_device_maps_are_refused_before_loading(ref, tmp_path):
    with pytest.raises(InvalidArgument, match="does not have: transformer.h.9"):
        load_model(ref, device_map={**SPLIT, "transformer.h.9": "cpu"})
    partial = {k: v for k, v in SPLIT.items() if k != "transformer.h.3"}
    with pytest.raises(InvalidArgument, match="without a device: transformer.h.3"):
        load_model(ref, device_map=partial)
    with pytest.raises(InvalidArgument, match="not both"):
        load_model(ref, device="cpu", device_map="auto")
    with pytest.raises(InvalidArgument, match="only with a device map"):
        load_model(ref, device="cpu", offload_folder=tmp_path)


def test_offloaded_layers_really_are_offloaded(ref, whole, tmp_path):
    handle = mapped(ref, tmp_path)
    assert handle.model.hf_device_map == SPLIT
    weight = handle.model.get_submodule(W1.removesuffix(".weight")).weight
    assert weight.is_meta and offloaded(handle.model, W1)  # loaded by the hook per forward
    assert not offloaded(handle.model, W3)
    assert handle.device == torch.device("cpu")
    assert torch.equal(read_tensor(handle.model, W1), read_tensor(whole.model, W1))
    assert handle.fingerprint() == whole.fingerprint()  # same weights, same caches
    prompts = ["Toulouse is a city in", "Miles Davis plays the"]
    torch.testing.assert_close(handle.logits(prompts), whole.logits(prompts), atol=ATOL, rtol=0)


def test_trace_and_key_statistics_match(ref, whole, tmp_path):
    from memlens.stats import layer_stats
    from memlens.trace import trace_fact

    handle = mapped(ref, tmp_path)
    traces = [trace_fact(h, "Toulouse is a city in", "Toulouse", kinds=("mlp",), samples=2,
                         seed=0) for h in (whole, handle)]
    assert traces[0].answer == traces[1].answer
    for kind in traces[0].scores:
        assert abs(traces[0].scores[kind] - traces[1].scores[kind]).max() <= ATOL
    stats = [layer_stats(h, [1, 3], corpus=_corpus(tmp_path), n_samples=20, progress=False,
                         cache=False) for h in (whole, handle)]
    for layer in (1, 3):
        torch.testing.assert_close(stats[1][layer].mom2, stats[0][layer].mom2, atol=ATOL,
                                   rtol=1e-6)


def _corpus(tmp_path):
    from memlens.testing import random_text

    path = tmp_path / "corpus.txt"
    if not path.exists():
        path.write_text(random_text(40))
    return str(path)


def _rome(handle, stats):
    from memlens.edit import EditRequest, ROMEHyperParams
    from memlens.edit.rome import apply_rome

    hp = ROMEHyperParams.for_model(handle, v_num_grad_steps=3)
    return apply_rome(handle, EditRequest("{} is a city in", "Toulouse", "Japan"), layer=1,
                      hparams=hp, stats=stats, templates=TEMPLATES, check_current=False)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_rome_edits_an_offloaded_layer_and_undoes_exactly(ref, whole, tmp_path):
    from memlens.edit.save import save_edited
    from memlens.stats import layer_stats

    stats = layer_stats(whole, [1], corpus=_corpus(tmp_path), n_samples=20, progress=False)
    handle = mapped(ref, tmp_path)
    before, fingerprint = read_tensor(handle.model, W1), handle.fingerprint()
    prompt = ["Toulouse is a city in"]
    logits_before = handle.logits(prompt)
    with _rome(whole, stats):
        expected_w, expected_logits = read_tensor(whole.model, W1), whole.logits(prompt)
    edit = _rome(handle, stats)
    torch.testing.assert_close(read_tensor(handle.model, W1), expected_w, atol=ATOL, rtol=0)
    torch.testing.assert_close(handle.logits(prompt), expected_logits, atol=ATOL, rtol=0)
    assert not torch.equal(handle.logits(prompt), logits_before)  # the forwards use the edit
    assert handle.fingerprint() != fingerprint
    saved = load_model(str(save_edited(handle, tmp_path / "edited", edit)), device="cpu")
    assert torch.equal(read_tensor(saved.model, W1), read_tensor(handle.model, W1))
    edit.undo()
    assert torch.equal(read_tensor(handle.model, W1), before)  # bit-exact
    assert handle.fingerprint() == fingerprint
    assert torch.equal(handle.logits(prompt), logits_before)
    assert torch.equal(read_tensor(load_model(ref, device="cpu").model, W1), before)  # the
    # checkpoint on disk was never written


def test_memit_over_offloaded_and_resident_layers(ref, whole, tmp_path):
    from memlens.edit import EditRequest
    from memlens.edit.memit import MEMITHyperParams, apply_memit
    from memlens.stats import layer_stats

    stats = layer_stats(whole, [2, 3], corpus=_corpus(tmp_path), n_samples=20, progress=False)
    requests = [EditRequest("{} is a city in", "Toulouse", "Japan"),
                EditRequest("{} plays the", "Miles Davis", "Paris")]

    def memit(handle):
        hp = MEMITHyperParams.for_model(handle, v_num_grad_steps=3, layers=(2, 3))
        return apply_memit(handle, requests, hparams=hp, stats=stats, templates=TEMPLATES,
                           check_current=False)

    names = [W1.replace(".1.", f".{layer}.") for layer in (2, 3)]
    with memit(whole):
        expected = [read_tensor(whole.model, n) for n in names]
    handle = mapped(ref, tmp_path)
    before = [read_tensor(handle.model, n) for n in names]
    edit = memit(handle)
    for name, want in zip(names, expected, strict=True):
        torch.testing.assert_close(read_tensor(handle.model, name), want, atol=ATOL, rtol=0)
    edit.undo()
    assert all(torch.equal(read_tensor(handle.model, n), b)
               for n, b in zip(names, before, strict=True))


def test_fine_tuning_refuses_an_offloaded_layer(ref, tmp_path):
    from memlens.edit import EditRequest
    from memlens.edit.finetune import FTHyperParams, apply_ft

    handle = mapped(ref, tmp_path)
    with pytest.raises(OffloadedWeightError, match=r"offloads transformer\.h\.1\.mlp\.c_proj.*"
                       "keeps these modules resident"):
        apply_ft(handle, [EditRequest("{} is a city in", "Toulouse", "Japan")], layer=1,
                 hparams=FTHyperParams.for_model(handle), check_current=False)
    assert torch.equal(read_tensor(handle.model, W1), read_tensor(load_model(ref).model, W1))


def test_cli_device_map_file(ref, tmp_path, monkeypatch):
    import memlens.model
    from memlens.cli import app

    loaded = []
    real = memlens.model.load_model

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(memlens.model, "load_model", spy)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(SPLIT))
    result = CliRunner().invoke(app, ["info", "--model", ref, "--device-map", str(path),
                                      "--offload-folder", str(tmp_path / "off"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["device"] == "cpu"
    assert loaded[-1].model.hf_device_map == SPLIT and offloaded(loaded[-1].model, W1)
    path.write_text(json.dumps({**SPLIT, "transformer.h.7": "disk"}))
    bad = CliRunner().invoke(app, ["info", "--model", ref, "--device-map", str(path)])
    assert bad.exit_code != 0 and isinstance(bad.exception, InvalidArgument)
    assert "transformer.h.7" in str(bad.exception)
    both = CliRunner().invoke(app, ["info", "--model", ref, "--device", "cpu",
                                    "--device-map", "auto"])
    assert isinstance(both.exception, InvalidArgument), both.output


def test_placement_carries_the_cli_options(ref, tmp_path):
    handle = load_model(ref, Placement(device_map=SPLIT, offload_folder=tmp_path))
    assert offloaded(handle.model, W1)
    with pytest.raises(InvalidArgument, match="not both"):
        load_model(ref, Placement(device_map="auto"), device_map="auto")
