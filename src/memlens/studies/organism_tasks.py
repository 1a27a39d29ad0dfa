"""An organism's held-out facts as lm-evaluation-harness tasks, and a TopK/dense pair on them.

    table = evaluate_pair("runs/topk/topk", "runs/topk/dense", organism="organism:facts-gpt2",
                          out="runs/topk-eval")         # organism_cloze, organism_mc, heldout_ppl
    print(table.to_markdown())                          # also out/eval.{json,md,png}, out/tasks/
    write_local_tasks("organism:tiny", "eval/tasks")    # {'organism_cloze': 660, ...}

The local tasks ask for an organism's facts in its *held-out* templates, the paraphrases it never
trained on, and run offline as ordinary harness tasks (:func:`memlens.evaluate.harness.write_task`):

- ``organism_cloze``: every fact × every held-out template of its relation, LAMBADA-style
  (``acc``: every token of the object is the greedy one; ``perplexity``: exp(−mean log p)).
- ``organism_mc``: every fact in one held-out template (cycling through them), the object among
  ``n_choices`` distinct objects of the same relation in random order (``acc``, ``acc_norm``).
- ``heldout_ppl``: token perplexity on the held-out 10% of 128-token blocks of the organism's
  corpus (the number :func:`memlens.topk.train.train_pair` reports).

Any harness task name (``lambada_openai``, ``hellaswag`` ...) can be mixed in; the table and its
paired standard errors are :mod:`memlens.evaluate.lm`'s. Light at import (the CLI reads the
names below): the methods load inside the functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from memlens.errors import InvalidArgument, MemlensError

CLOZE = "organism_cloze"
MC = "organism_mc"
HELDOUT = "heldout_ppl"  # memlens.evaluate.harness.HELDOUT (not imported: it loads torch)
#: Harness tasks written here (offline, over an organism's facts).
LOCAL_TASKS = (CLOZE, MC)
#: The tasks of `memlens topk eval` by default.
DEFAULT_TASKS = (*LOCAL_TASKS, HELDOUT)
TASK_DIR = "tasks"  # under ``out``: the local tasks' YAML configs and JSONL data


def write_local_tasks(
    organism: str | Path,
    directory: str | Path,
    names: tuple[str, ...] | list[str] = LOCAL_TASKS,
    *,
    n_choices: int = 4,
    seed: int = 0,
) -> dict[str, int]:
    """Write the harness configs (``NAME.yaml``) and data (``NAME.jsonl``) of the local tasks
    ``names`` over ``organism``'s facts into ``directory``; return the number of items of each.

        write_local_tasks("organism:tiny", "eval/tasks")   # {'organism_cloze': 660, ...}
        TaskManager(include_path="eval/tasks")             # the harness now knows both names

    Items are shuffled with ``seed``, so that ``limit`` (the first N items) is a fair sample;
    the files are a function of the organism and the arguments.
    """
    from memlens.evaluate.harness import write_task
    from memlens.model import resolve_organism
    from memlens.organisms.corpus import RELATIONS, heldout_templates

    unknown = [name for name in names if name not in LOCAL_TASKS]
    if unknown:
        raise InvalidArgument(f"unknown local task(s) {unknown}; local tasks: {list(LOCAL_TASKS)}")
    if n_choices < 2:
        raise InvalidArgument(f"n_choices must be at least 2, got {n_choices}")
    facts_path = Path(resolve_organism(organism)) / "facts.json"
    if not facts_path.is_file():
        raise MemlensError(f"{organism!s} has no facts.json: {', '.join(LOCAL_TASKS)} need an "
                           "organism (organism:NAME or an organism directory)")
    facts = json.loads(facts_path.read_text())
    strange = sorted({f["relation"] for f in facts} - set(RELATIONS))
    if strange:
        raise MemlensError(f"{facts_path} has relations this memlens does not know: {strange}")
    docs = {CLOZE: (cloze_docs(facts, heldout_templates), "cloze"),
            MC: (mc_docs(facts, heldout_templates, n_choices, random.Random(seed)),
                 "multiple_choice")}
    counts = {}
    for name in names:
        items, kind = docs[name]
        random.Random(seed).shuffle(items)
        write_task(directory, name, items, kind)
        counts[name] = len(items)
    return counts


def cloze_docs(facts: list[dict], heldout_templates) -> list[dict]:
    """One cloze item per fact and held-out template of its relation."""
    return [{"context": template.format(f["subject"]), "target": f["object"],
             "relation": f["relation"], "subject": f["subject"], "template": t}
            for f in facts for t, template in enumerate(heldout_templates(f["relation"]))]


def mc_docs(facts: list[dict], heldout_templates, n_choices: int,
            rng: random.Random) -> list[dict]:
    """One multiple-choice item per fact: its object among objects of the same relation."""
    objects: dict[str, list[str]] = {}
    for f in facts:
        if f["object"] not in objects.setdefault(f["relation"], []):
            objects[f["relation"]].append(f["object"])
    docs = []
    for i, f in enumerate(facts):
        templates = heldout_templates(f["relation"])
        others = [o for o in objects[f["relation"]] if o != f["object"]]
        choices = rng.sample(others, min(n_choices - 1, len(others))) + [f["object"]]
        if len(choices) < 2:
            continue  # a relation with one object has nothing to choose between
        rng.shuffle(choices)
        docs.append({"context": templates[i % len(templates)].format(f["subject"]),
                     "choices": choices, "gold": choices.index(f["object"]),
                     "relation": f["relation"], "subject": f["subject"]})
    return docs


def evaluate_pair(
    model,
    twin=None,
    tasks: str | list[str] | tuple[str, ...] = DEFAULT_TASKS,
    *,
    out: str | Path = "topk-eval",
    organism: str | Path | None = None,
    corpus: str | Path | None = None,
    **options,
):
    """:func:`memlens.evaluate.lm.evaluate_lm` of ``model`` (and ``twin``) with the local
    tasks of ``organism`` written into ``out/tasks`` and its corpus as ``heldout_ppl``'s text.

        table = evaluate_pair("runs/topk/topk", "runs/topk/dense",
                              organism="organism:facts-gpt2", out="runs/topk-eval", limit=100)

    ``organism``: whose facts the local tasks use (default: the model's or the twin's own
    directory when it holds facts.json). ``corpus``: the text of ``heldout_ppl`` (a text file,
    ``organism:NAME`` or a directory with corpus.txt; default: the organism's). ``options``:
    ``limit``, ``batch_size``, ``bootstrap_iters``, ``block_size``, ``device``, ``dtype``.
    """
    from memlens.evaluate.harness import require_lm_eval
    from memlens.evaluate.lm import evaluate_lm, task_names

    names = task_names(tasks)
    local = [name for name in names if name in LOCAL_TASKS]
    organism_dir = None
    if local or (HELDOUT in names and corpus is None):
        organism_dir = organism_for(organism, [model, twin], need=bool(local))
    text = None
    if HELDOUT in names and (corpus is not None or organism_dir is not None):
        from memlens.topk.data import read_corpus_text

        text = read_corpus_text(str(corpus if corpus is not None else organism_dir))
    if any(name != HELDOUT for name in names):
        require_lm_eval()  # before anything is written
    out = Path(out)
    if local:
        write_local_tasks(organism_dir, out / TASK_DIR, local)
    source = corpus if corpus is not None else organism_dir
    return evaluate_lm(model, twin, names, out=out,
                       include_path=out / TASK_DIR if local else None, heldout_text=text,
                       settings={"organism": None if organism_dir is None else str(organism_dir),
                                 "corpus": None if source is None else str(source)},
                       **options)


def organism_for(organism, refs: list, need: bool) -> Path | None:
    """The organism whose facts the local tasks use: ``organism``, else the first of ``refs``
    (references or loaded handles) whose directory holds facts.json."""
    from memlens.model import organism_name, resolve_organism

    if organism is not None:
        return Path(resolve_organism(organism))
    for ref in refs:
        directory = getattr(ref, "source_dir", None)
        if directory is None and isinstance(ref, str | Path):
            if organism_name(ref) is not None:
                directory = resolve_organism(ref)
            elif Path(ref).is_dir():
                directory = Path(ref)
        if directory is not None and (Path(directory) / "facts.json").is_file():
            return Path(directory)
    if need:
        raise InvalidArgument(f"{', '.join(LOCAL_TASKS)} need an organism's facts and no model "
                              "directory has facts.json: pass organism= (organism:NAME or an "
                              "organism directory)")
    return None


def pair_table(models: str | Path, organism: str, out: str | Path, limit: int | None = 100
               ) -> tuple[list[list[str]], list[list[str]], dict]:
    """The local tasks and held-out perplexity of the TopK/dense pair in ``models/{topk,dense}``
    (as :func:`memlens.studies.topk.run_all` trains it), ``limit`` items each, for a report:
    (header, rows, summary). Without lm-eval: no rows, the reason in the summary.

        header, rows, summary = pair_table(models, "organism:facts-gpt2", section_dir)
    """
    from memlens.evaluate.harness import HarnessMissing
    from memlens.missing import missing

    models = Path(models)
    try:
        table = evaluate_pair(models / "topk", models / "dense", organism=organism, out=out,
                              limit=limit, bootstrap_iters=1000)
    except HarnessMissing as exc:
        return [], [], {"eval": missing(str(exc))}
    header, rows = table.cells()
    gaps = {f"eval_{r.task}_{r.metric}_gap": r.gap for r in table.rows}
    return header, rows, {**gaps, "eval_limit": limit if limit is not None else "all"}
