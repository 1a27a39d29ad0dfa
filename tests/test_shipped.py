"""Shipped organisms: the mechanism (on `tiny`, shipped into a temporary root) and the real
shipped default, `facts-gpt2` (its manifest, digests and a quick evaluation)."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from pathlib import Path

import pytest

from memlens.errors import MemlensError
from memlens.organisms import registry, specs
from memlens.organisms.ship import ship, verify

SHIP_HINT = "run `memlens organism ship facts-gpt2` after building"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (hidden ones too) → (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def shipped_root(tmp_path, monkeypatch):
    """An empty shipped-organisms root and an empty MEMLENS_HOME, both temporary."""
    root = tmp_path / "shipped"
    monkeypatch.setattr(registry, "SHIPPED_ROOT", root)
    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path / "home"))
    return root


@pytest.fixture
def no_build(monkeypatch):
    """Record builds instead of training: the list of organism names built."""
    import memlens.organisms.build as build

    calls: list[str] = []

    def fake(spec, out_dir, progress=True):
        calls.append(spec.name)
        (out_dir / "organism.json").write_text(json.dumps({"name": spec.name}))
        return {}

    monkeypatch.setattr(build, "build_organism", fake)
    return calls


@pytest.fixture
def shipped_tiny(tiny_organism, shipped_root, no_build):
    """`tiny` shipped into the temporary root (built in the shared cache first)."""
    return ship("tiny", tiny_organism)


@pytest.mark.slow
def test_ship_writes_a_verified_manifest(shipped_tiny, tiny_organism):
    spec = registry.ORGANISMS["tiny"]
    assert shipped_tiny == registry.SHIPPED_ROOT / "tiny"
    manifest = verify(shipped_tiny)
    assert manifest["name"] == "tiny" and manifest["key"] == spec.key()
    assert manifest["python"] == specs.PYTHON_VERSION and manifest["dtype"] == "F32"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "organism.json",
                 "counterfact.json", "known_facts.json", "facts.json", "paragraphs.jsonl",
                 "corpus.txt", "reference_texts.json"):
        assert name in manifest["files"], name
        assert manifest["sizes"][name] == (tiny_organism / name).stat().st_size
    assert registry.COMPLETE not in manifest["files"] and not (shipped_tiny / registry.COMPLETE).exists()
    assert [p.name for p in registry.SHIPPED_ROOT.iterdir()] == ["tiny"]  # no temporary left
    assert ship("tiny", tiny_organism) == shipped_tiny  # re-shipping replaces it
    assert [p.name for p in registry.SHIPPED_ROOT.iterdir()] == ["tiny"]


@pytest.mark.slow
def test_ensure_uses_the_shipped_copy_without_building(shipped_tiny, no_build):
    from memlens.model import load_model

    assert registry.ensure("tiny") == shipped_tiny
    assert registry.resolve("organism:tiny") == shipped_tiny
    assert load_model("organism:tiny", device="cpu").source_dir == shipped_tiny
    assert no_build == []


@pytest.mark.slow
def test_changed_spec_falls_back_to_the_cache(shipped_tiny, no_build, monkeypatch):
    changed = dataclasses.replace(registry.ORGANISMS["tiny"], steps=801)
    monkeypatch.setitem(registry.ORGANISMS, "tiny", changed)
    with pytest.warns(UserWarning, match="spec's key is now"):
        path = registry.ensure("tiny", progress=False)
    assert path == registry.organism_dir("tiny") and no_build == ["tiny"]


@pytest.mark.slow
def test_from_scratch_ignores_the_shipped_copy(shipped_tiny, no_build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = registry.ensure("tiny", progress=False, from_scratch=True)
    assert path == registry.organism_dir("tiny") and no_build == ["tiny"]
    assert registry.ensure("tiny") == shipped_tiny


@pytest.mark.slow
def test_a_copy_shipped_from_another_python_is_used(shipped_tiny, no_build):
    manifest = json.loads((shipped_tiny / registry.MANIFEST).read_text())
    manifest["python"] = "3.99"
    manifest["key"] = registry.ORGANISMS["tiny"].key(python="3.99")
    (shipped_tiny / registry.MANIFEST).write_text(json.dumps(manifest))
    assert registry.ensure("tiny") == shipped_tiny and no_build == []


@pytest.mark.slow
def test_corrupted_files_are_detected(shipped_tiny, no_build):
    corpus = shipped_tiny / "corpus.txt"
    original = corpus.read_bytes()
    flipped = bytearray(original)
    flipped[10] ^= 1  # same size: only the digest sees it
    corpus.write_bytes(bytes(flipped))
    with pytest.raises(MemlensError, match="corpus.txt does not match its sha256"):
        verify(shipped_tiny)
    corpus.write_bytes(original)
    (shipped_tiny / "extra.json").write_text("{}")
    with pytest.raises(MemlensError, match="files its manifest does not list: extra.json"):
        verify(shipped_tiny)
    (shipped_tiny / "extra.json").unlink()
    weights = shipped_tiny / "model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    with pytest.warns(UserWarning, match=r"model.safetensors is \d+ bytes"):
        assert registry.ensure("tiny", progress=False) == registry.organism_dir("tiny")
    assert no_build == ["tiny"]
    weights.unlink()
    with pytest.raises(MemlensError, match="model.safetensors is missing"):
        verify(shipped_tiny)


@pytest.mark.slow
def test_ship_refuses_an_incomplete_stale_or_too_big_build(tiny_organism, shipped_root, tmp_path,
                                                           monkeypatch):
    import shutil

    import memlens.organisms.ship as ship_module

    build = tmp_path / "build"
    shutil.copytree(tiny_organism, build)
    (build / registry.COMPLETE).unlink()
    with pytest.raises(MemlensError, match="not a complete build"):
        ship("tiny", build)
    (build / registry.COMPLETE).write_text("0123456789ab")
    with pytest.raises(MemlensError, match="not 'tiny' with the spec's key"):
        ship("tiny", build)
    (build / registry.COMPLETE).write_text(registry.ORGANISMS["tiny"].key())
    monkeypatch.setattr(ship_module, "MAX_FLOAT32_MB", 0)
    with pytest.raises(MemlensError, match="store it in bf16/fp16"):
        ship("tiny", build)
    assert not shipped_root.exists() or not any(shipped_root.iterdir())


@pytest.mark.slow
def test_nothing_writes_into_the_shipped_copy(shipped_tiny, tmp_path):
    """Loading, tracing, key statistics and the organism evaluation write under MEMLENS_HOME."""
    from memlens.model import load_model
    from memlens.stats import layer_stats
    from memlens.studies.organism_report import evaluate_organism, recall_site_report

    before = _snapshot(shipped_tiny)
    handle = load_model("organism:tiny", device="cpu")
    assert handle.source_dir == shipped_tiny
    layer_stats(handle, [1], n_samples=8)
    site = recall_site_report(shipped_tiny, n_facts=3, samples=2)
    assert site is not None and site["n_facts"] >= 1
    assert evaluate_organism(shipped_tiny)["n_facts"] >= 200
    assert _snapshot(shipped_tiny) == before
    home = tmp_path / "home"
    assert (home / "traces").is_dir() and (home / "stats").is_dir()


@pytest.mark.slow
def test_build_id_tells_a_shipped_copy_from_a_cache_build(shipped_tiny, tiny_organism):
    shipped, cached = registry.build_id(shipped_tiny), registry.build_id(tiny_organism)
    assert cached == tiny_organism.name
    assert shipped.startswith(f"{cached}-shipped-") and shipped != cached


@pytest.mark.slow
def test_cli_list_and_ship(shipped_root, tiny_organism, no_build):
    from typer.testing import CliRunner

    from memlens.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["organism", "ship", "tiny", "--build", str(tiny_organism),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["path"] == str(shipped_root / "tiny")
    result = runner.invoke(app, ["organism", "list", "--json"])
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["tiny"]["status"] == "shipped" and rows["tiny"]["path"] == str(shipped_root / "tiny")
    assert rows["facts-llama"]["status"] == "not built"


# ----------------------------------------------------------------- the shipped default

def test_default_organism_is_shipped_and_knows_its_facts():
    """The committed copy of `facts-gpt2`: manifest key = the spec's key (for the Python it was
    built on), every file's sha256 as listed, and ≥ 0.9 greedy first-token accuracy on 200 of
    its facts over their relation's training templates (the organism eval's fact accuracy,
    0.962 on all facts). Loads in seconds, trains nothing."""
    from memlens.model import load_model
    from memlens.organisms import corpus as C
    from memlens.studies.organism_report import fact_accuracy

    spec = registry.ORGANISMS["facts-gpt2"]
    path = registry.shipped_dir("facts-gpt2")
    assert (path / registry.MANIFEST).is_file(), f"no shipped facts-gpt2 at {path}: {SHIP_HINT}"
    try:
        manifest = verify(path)
    except MemlensError as e:
        pytest.fail(f"{e}; {SHIP_HINT}")
    assert manifest["key"] == spec.key(python=manifest["python"]), (
        f"shipped facts-gpt2 has key {manifest['key']}, the spec's is "
        f"{spec.key(python=manifest['python'])}: {SHIP_HINT}")
    assert registry.ensure("facts-gpt2") == path
    handle = load_model("organism:facts-gpt2", device="cpu")
    facts = json.loads((path / "facts.json").read_text())
    sample = [C.Fact(**f) for f in random.Random(0).sample(facts, k=min(200, len(facts)))]
    accuracy = fact_accuracy(handle.model, handle.tokenizer, sample,
                             n_templates=spec.facts.n_train_templates)
    assert accuracy >= 0.9, (
        f"shipped facts-gpt2 answers {accuracy:.3f} of its sampled facts: {SHIP_HINT}")


def test_the_demo_topk_pair_is_shipped_and_unpacks_to_the_trained_models(tmp_path, monkeypatch):
    """The demo trains no TopK model: the pair for its settings is shipped (float16 weights,
    sha256 manifest) and unpacks into the cache as float32 models whose held-out perplexity is
    the one recorded at training (to 1e-3; float16 storage moves it in the 6th digit)."""
    import math

    from memlens.model import load_model
    from memlens.studies.demo import DemoConfig
    from memlens.studies.topk import PAIR_MODELS, SHIPPED_PAIRS, pair_name, shared_models_dir
    from memlens.topk import TopKTrainConfig
    from memlens.topk.data import organism_corpus, text_blocks
    from memlens.topk_mlp import topk_modules
    from memlens.trainer import evaluate_loss

    config = DemoConfig()
    cfg = TopKTrainConfig(steps=config.topk_steps)
    name = pair_name(config.model, cfg)
    assert (SHIPPED_PAIRS / name).is_dir(), f"no shipped TopK pair {name}"
    verify(SHIPPED_PAIRS / name)
    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path / "home"))
    models = shared_models_dir(config.model, cfg)
    assert models.is_relative_to(tmp_path)
    corpus = organism_corpus(config.model)
    _, heldout = text_blocks(corpus.tokenizer, corpus.text, 128)
    for model in PAIR_MODELS:
        handle = load_model(str(models / model), device="cpu")
        assert all(p.dtype.itemsize == 4 for p in handle.model.parameters())
        assert bool(list(topk_modules(handle.model))) == (model == "topk")
        recorded = json.loads((models / model / "train_result.json").read_text())["heldout_ppl"]
        assert abs(math.exp(evaluate_loss(handle.model, heldout)) / recorded - 1) < 1e-3


def test_the_topk_model_trained_like_the_organism_is_shipped(tmp_path, monkeypatch):
    """The TopK twin of the default organism (its recipe and data; the organism is the dense
    twin) is shipped as float16 weights and unpacks into an organism directory: float32, TopK,
    the held-out perplexity recorded at training (to 1e-3), the organism's CounterFact cases,
    and its own known facts (most of the organism's)."""
    import math

    from memlens.model import load_model
    from memlens.studies.topk import (
        SHIPPED_PAIRS,
        TWIN_MODELS,
        organism_recipe,
        organism_twin,
        pair_name,
    )
    from memlens.topk.data import organism_corpus, text_blocks
    from memlens.topk_mlp import topk_modules
    from memlens.trainer import evaluate_loss

    name = pair_name("organism:facts-gpt2", organism_recipe("organism:facts-gpt2"))
    verify(SHIPPED_PAIRS / name)
    assert sorted(p.name for p in (SHIPPED_PAIRS / name).iterdir() if p.is_dir()) == \
        list(TWIN_MODELS)
    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path / "home"))
    twin = organism_twin("organism:facts-gpt2")
    assert twin.is_relative_to(tmp_path)
    handle = load_model(str(twin), device="cpu")
    assert all(p.dtype.itemsize == 4 for p in handle.model.parameters())
    assert list(topk_modules(handle.model))
    corpus = organism_corpus("organism:facts-gpt2")
    _, heldout = text_blocks(corpus.tokenizer, corpus.text, 128)
    recorded = json.loads((twin / "train_result.json").read_text())["heldout_ppl"]
    assert abs(math.exp(evaluate_loss(handle.model, heldout)) / recorded - 1) < 1e-3
    organism = registry.resolve("organism:facts-gpt2")
    assert (twin / "counterfact.json").read_text() == \
        (organism / "counterfact.json").read_text()
    known = json.loads((twin / "known_facts.json").read_text())
    assert len(known) >= 0.9 * len(json.loads((organism / "known_facts.json").read_text()))
