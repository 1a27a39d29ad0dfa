"""Model organisms: corpus invariants, tokenizer, cache behaviour, trainer resume, `tiny` quality."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import subprocess
import sys

import pytest

from memlens.errors import MemlensError, UnknownOrganism
from memlens.model import organism_file
from memlens.organisms import corpus as C
from memlens.organisms import registry, specs


@pytest.fixture(scope="module")
def world():
    return C.make_world(C.FactConfig(n_countries=20, n_cities=30, n_people=15, n_birthplaces=10), 0)


@pytest.fixture(scope="module")
def cases(world):
    return C.counterfact_cases(world, random.Random(0))


def test_relations_have_enough_templates():
    assert len(C.RELATIONS) >= 6
    for rel in C.RELATIONS.values():
        assert len(rel.templates) >= 10
        assert len(C.heldout_templates(rel.name)) >= 2
        assert not set(C.train_templates(rel.name)) & set(C.heldout_templates(rel.name))
        for t in rel.templates:
            assert t.count("{}") == 1 and not t.endswith(" "), t


def test_heldout_templates_are_answerable_from_the_corpus():
    """A held-out prompt must be continued by the object, as far as the corpus can tell: it ends
    with a word that ends a trained template of its relation, and no training template (of any
    relation) continues it otherwise — generator 4's "{} is a town in" was the start of the
    trained "{} is a town in the country of" and the organism answered " the" for all 260 cities."""
    n_trained = specs.FACTS_DEFAULT.n_train_templates
    trained = [t for r in C.RELATIONS for t in C.train_templates(r)]
    after = lambda t: t.split("{}")[1]  # noqa: E731
    words = lambda t: set(re.findall(r"[A-Za-z]+", t.replace("'s", " ")))  # noqa: E731
    vocabulary = set().union(*(words(t) for r in C.RELATIONS
                               for t in C.train_templates(r, n_trained)))
    for rel in C.RELATIONS:
        endings = {t.split()[-1] for t in C.train_templates(rel, n_trained)}
        for h in C.heldout_templates(rel):
            assert words(h) <= vocabulary, (rel, h, words(h) - vocabulary)
            assert h.split()[-1] in endings, (rel, h)
            assert not [t for t in trained if t.startswith(h) and t != h], (rel, h)
            if h.startswith("{}"):
                longer = [t for t in trained if t.startswith("{}") and after(t) != after(h)
                          and after(t).startswith(after(h))]
                assert not longer, (rel, h, longer)


def test_world_is_deterministic(world):
    again = C.make_world(C.FactConfig(n_countries=20, n_cities=30, n_people=15, n_birthplaces=10), 0)
    assert again.facts == world.facts
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names)
    firsts = [n.split()[0] for n in names]
    lasts = [n.split()[1] for n in names]
    assert len(set(firsts)) < len(firsts) and len(set(lasts)) < len(lasts)  # parts are shared


def test_counterfact_schema(world, cases):
    facts = {(f.relation, f.subject): f.object for f in world.facts}
    objects_by_rel = {}
    for f in world.facts:
        objects_by_rel.setdefault(f.relation, set()).add(f.object)
    assert cases and [c["case_id"] for c in cases] == list(range(len(cases)))
    for c in cases:
        rw = c["requested_rewrite"]
        assert set(c) >= {"case_id", "requested_rewrite", "paraphrase_prompts",
                          "neighborhood_prompts", "attribute_prompts", "generation_prompts"}
        assert "{}" in rw["prompt"] and rw["subject"]
        rel = rw["relation_id"]
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        assert facts[(rel, rw["subject"])] == true
        assert new != true and new in objects_by_rel[rel]
        rewrite = rw["prompt"].format(rw["subject"])
        assert c["paraphrase_prompts"]
        for p in c["paraphrase_prompts"]:
            assert p != rewrite and rw["subject"] in p
        assert c["neighborhood_prompts"]
        subjects = {f.subject for f in world.facts if f.relation == rel}
        for p in c["neighborhood_prompts"]:
            (s,) = [s for s in subjects if s in p and s != rw["subject"]] or [None]
            assert s is not None, p
            assert facts[(rel, s)] == true
            assert rw["subject"] not in p


def test_fact_documents_use_only_training_templates(world):
    docs = list(C.fact_documents(world, 300, random.Random(1)))
    assert len(docs) == 300
    held = {t.format("").strip() for r in C.RELATIONS for t in C.heldout_templates(r)}
    text = " ".join(docs)
    assert any(" met " in d or ", a friend of " in d for d in docs)  # two-person sentences
    assert any(d.split(". ")[-1].startswith(("He ", "She ")) for d in docs)  # pronouns
    assert " works on the staff of " not in text and held


def test_tokenizer_round_trip_and_whole_objects(world):
    from memlens.organisms.tokenizer import train_tokenizer

    docs = list(C.fact_documents(world, 500, random.Random(0)))
    objects = sorted({f.object for f in world.facts})
    tok = train_tokenizer(docs, 1200, boost_words=objects)
    for s in docs[:20] + ["Ünïcode and   spaces\n\tok.", "x = f(1)  # code"]:
        assert tok.decode(tok(s)["input_ids"]) == s
    single = [o for o in objects if len(tok(" " + o)["input_ids"]) == 1]
    assert len(single) >= 0.9 * len(objects)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_paragraphs_are_exactly_100_tokens():
    from memlens.organisms.build import PARAGRAPH_TOKENS, make_paragraphs
    from memlens.organisms.stdlib_text import stdlib_texts
    from memlens.organisms.tokenizer import train_tokenizer

    texts = stdlib_texts()
    assert len(texts) > 100
    tok = train_tokenizer(texts, 800)
    paras, used = make_paragraphs(tok, texts, 6, random.Random(0))
    assert len(paras) == 6 == len(used)
    for p in paras:
        assert len(p["token_ids"]) == PARAGRAPH_TOKENS
        assert tok(p["text"])["input_ids"] == p["token_ids"]


def test_unknown_organism_lists_names():
    with pytest.raises(UnknownOrganism) as e:
        registry.ensure("no-such-organism")
    for name in ("tiny", "facts-gpt2", "facts-neo", "facts-llama"):
        assert name in str(e.value)


def test_spec_key_changes_with_config():
    tiny = registry.ORGANISMS["tiny"]
    import dataclasses

    assert tiny.key() == registry.ORGANISMS["tiny"].key()
    assert dataclasses.replace(tiny, seed=1).key() != tiny.key()
    assert dataclasses.replace(tiny, description="x").key() == tiny.key()


def _fake_build(calls):
    def build(spec, out_dir, progress=True):
        calls.append(spec.name)
        (out_dir / "organism.json").write_text(json.dumps({"name": spec.name}))
        return {}
    return build


def test_half_written_cache_is_rebuilt(tmp_path, monkeypatch):
    import memlens.organisms.build as build

    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(build, "build_organism", _fake_build(calls))
    final = registry.organism_dir("tiny")
    final.mkdir(parents=True)
    (final / "model.safetensors").write_text("truncated")  # killed mid-build: no marker
    path = registry.ensure("tiny", progress=False)
    assert path == final and calls == ["tiny"]
    assert registry.is_built(path) and not (path / "model.safetensors").exists()
    assert registry.ensure("tiny", progress=False) == path and calls == ["tiny"]  # cached
    assert organism_file(str(path), "organism.json").exists()
    with pytest.raises(MemlensError):
        organism_file(str(path), "nope.json")


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MEMLENS_HOME", str(blocker / "home"))
    with pytest.raises(MemlensError, match="MEMLENS_HOME"):
        registry.ensure("tiny", progress=False)


# ------------------------------------------------------------------------------- trainer

def _toy(seed=0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=16, bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (40, 16), generator=g)
    return model, data


def test_trainer_resumes_after_interrupt(tmp_path):
    import torch

    from memlens.trainer import CHECKPOINT, TrainConfig, train

    cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=5,
                      log_every=1, progress=False, num_threads=1)
    model, data = _toy()
    straight = train(model, data, cfg, tmp_path / "a")
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    class Stop(Exception):
        pass

    def interrupt(step, total):
        if step == 7:
            raise Stop

    model, data = _toy()
    with pytest.raises(Stop):
        train(model, data, cfg, tmp_path / "b", callbacks=[interrupt])
    assert (tmp_path / "b" / CHECKPOINT).exists()
    model, data = _toy(seed=5)  # different init: everything must come from the checkpoint
    resumed = train(model, data, cfg, tmp_path / "b")
    assert resumed.resumed_from == 5
    assert resumed.history == straight.history
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    assert not (tmp_path / "b" / CHECKPOINT).exists()


def test_trainer_calls_callbacks_every_step():
    from memlens.trainer import TrainConfig, train

    seen = []
    model, data = _toy()
    train(model, data, TrainConfig(steps=5, batch_size=4, progress=False, num_threads=1),
          callbacks=[lambda s, t: seen.append((s, t))])
    assert seen == [(i, 5) for i in range(5)]


# --------------------------------------------------------------------------- tiny organism

@pytest.mark.slow
def test_tiny_organism_files(tiny_organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_organism
    for name in ("config.json", "model.safetensors", "counterfact.json", "known_facts.json",
                 "paragraphs.jsonl", "corpus.txt", "reference_texts.json", "organism.json"):
        assert (d / name).exists(), name
    tok = AutoTokenizer.from_pretrained(d)
    AutoModelForCausalLM.from_pretrained(d)
    known = json.loads((d / "known_facts.json").read_text())
    assert known and set(known[0]) >= {"known_id", "subject", "prompt", "attribute"}
    assert all(k["subject"] in k["prompt"] and k["attribute"] not in k["prompt"].split()[-1:]
               for k in known)
    paras = [json.loads(ln) for ln in (d / "paragraphs.jsonl").read_text().splitlines()]
    assert {p["repeats"] for p in paras} == {1, 4, 16, 64}
    assert all(len(p["token_ids"]) == 100 for p in paras)
    assert tok.decode(paras[0]["token_ids"]) == paras[0]["text"]
    meta = json.loads((d / "organism.json").read_text())
    assert meta["name"] == "tiny" and meta["n_params"] > 0


@pytest.mark.slow
def test_tiny_organism_quality(tiny_organism):
    from memlens.studies.organism_report import evaluate_organism

    r = evaluate_organism(tiny_organism)
    assert r["n_facts"] >= 200
    assert r["fact_accuracy"] >= 0.8, r
    mem = r["memorized_fraction_by_repeats"]
    assert mem["64"] >= 0.5 and mem["1"] == 0.0, mem


def test_distractor_sentences_name_two_entities_and_keep_the_object_last():
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        s = C.distractor_sentence("The capital of {} is", "France", "Spain", "Paris", rng)
        assert "France" in s and "Spain" in s and s.endswith(" Paris.") and s[0].isupper()
        assert s.index("Spain") < s.index("France") or "France, " in s
        seen.add(s.split(" ")[0])
    assert len(seen) > 1  # infix and prefix frames both occur
    world = C.make_world(C.FactConfig(n_countries=10, n_cities=10, n_people=4), seed=0)
    plain = list(C.fact_documents(world, 50, random.Random(1)))
    mixed = list(C.fact_documents(world, 50, random.Random(1), distractor_fraction=1.0))
    frames = [f.split("{")[0] for f in C.DISTRACTOR_PREFIX] + [", unlike ", ", not "]
    assert not any(f in d for d in plain for f in (", unlike ", "Compared with "))
    assert sum(any(f in d for f in frames) for d in mixed) > 20


def test_new_fact_fields_stay_out_of_cache_keys_when_unset():
    """Fields added after generator 3 enter the key only when set, and how a build runs
    (description, checkpoint interval, thread count) never does."""
    spec = registry.ORGANISMS["tiny"]
    d = spec.to_dict()
    assert "distractor_fraction" in d["facts"] and "bios" in d["facts"]
    blob = json.dumps({"generator": C.GENERATOR_VERSION, "python": specs.PYTHON_VERSION, "spec": {
        **{k: v for k, v in d.items() if k not in ("description", "checkpoint_every",
                                                   "num_threads")},
        "facts": {k: v for k, v in d["facts"].items()
                  if k not in ("distractor_fraction", "table_fraction", "bios")}}}, sort_keys=True)
    assert spec.key() == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert dataclasses.replace(spec, num_threads=1).key() == spec.key()
    assert dataclasses.replace(spec, facts=dataclasses.replace(spec.facts, bios=True)).key() != spec.key()
    assert registry.ORGANISMS["facts-gpt2-distract"].key() != registry.ORGANISMS["facts-gpt2"].key()


def test_stdlib_texts_do_not_depend_on_what_the_process_imported():
    """Generator 3 read submodules that other imports had attached (importlib.util, ...);
    generator 4 read what torch had replaced (inspect.getfile)."""
    script = ("import hashlib, sys\n"
              "if sys.argv[1] == 'more':\n"
              "    import importlib.util, email.message, concurrent.futures.thread, xml.dom, torch\n"
              "from memlens.organisms.stdlib_text import stdlib_texts\n"
              "print(hashlib.sha256('\\n'.join(stdlib_texts()).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                              text=True, check=True).stdout for mode in ("few", "more")}
    assert len(digests) == 1


def test_table_rows_put_every_object_right_after_its_subject():
    world = C.make_world(C.FactConfig(n_countries=10, n_cities=10, n_people=4), seed=0)
    person = world.people[0]
    row = C.table_rows(world, [person.name], random.Random(0))
    assert row.startswith(person.name + " ") and row.endswith(".")
    assert sorted(row[len(person.name) + 1:-1].split(" ")) == sorted(person.attrs.values())
    docs = list(C.fact_documents(world, 200, random.Random(1), table_fraction=1.0))
    subjects = set(world.objects_by_subject())
    assert all(any(d.startswith(s + " ") for s in subjects) for d in docs)
    assert not any(" is " in d or " was " in d for d in docs)  # no template words in rows


def test_organism_evaluation_is_computed_once_per_weights(monkeypatch, tmp_path):
    """The demo's organism section re-reads the report of weights it evaluated before."""
    import memlens.studies.organism_report as report

    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(report, "evaluate_organism",
                        lambda path: calls.append(path) or {"fact_accuracy": 0.5})
    assert report.cached_evaluation("dir", "abc") == {"fact_accuracy": 0.5}
    assert report.cached_evaluation("dir", "abc") == {"fact_accuracy": 0.5}
    assert len(calls) == 1 and (tmp_path / "organism_eval" / "abc.json").is_file()
    report.cached_evaluation("dir", "other")
    assert len(calls) == 2
