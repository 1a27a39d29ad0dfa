"""A model (and its twin) on harness tasks and held-out perplexity: one table, its files.

    table = evaluate_lm("gpt2", tasks=["lambada_openai", "hellaswag"], limit=500, out="gpt2-eval")
    table = evaluate_lm("runs/topk/topk", "runs/topk/dense", ["my_cloze", "heldout_ppl"],
                        out="eval", include_path="eval/tasks", heldout_text=text)
    table.row("my_cloze", "acc").gap                 # model − twin, ± .gap_stderr (paired)

Models load through :func:`memlens.load_model` (a saved TopK model comes back with its TopK
layers) or come loaded. Task names: the harness's own (``lambada_openai``, ``hellaswag``,
``arc_easy`` ... — their data come from the hub or the local datasets cache), tasks written with
:func:`memlens.evaluate.harness.write_task` into ``include_path``, and ``heldout_ppl`` (held-out
blocks of ``heldout_text``, measured by memlens). Tasks over an organism's facts are
:mod:`memlens.studies.organism_tasks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memlens.errors import InvalidArgument
from memlens.evaluate.harness import (
    HELDOUT,
    Measure,
    heldout_measure,
    heldout_nll,
    lm_eval_version,
    run_harness,
    task_manager,
)
from memlens.evaluate.lm_table import EvalTable, compare, plot_table


def task_names(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from ``"a,b"`` or a list, blanks and repeats dropped; none is an error."""
    raw = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in raw if t and t.strip()))
    if not names:
        raise InvalidArgument(f"no tasks given: {HELDOUT}, tasks in the include path, or any "
                              "lm-evaluation-harness task (lambada_openai, hellaswag, ...)")
    return names


def evaluate_lm(
    model,
    twin=None,
    tasks: str | list[str] | tuple[str, ...] = (HELDOUT,),
    *,
    out: str | Path = "lm-eval",
    include_path: str | Path | None = None,
    heldout_text: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    bootstrap_iters: int = 10000,
    block_size: int = 128,
    device: str | None = None,
    dtype: str | None = None,
    settings: dict | None = None,
) -> EvalTable:
    """Evaluate ``model`` (and ``twin``, e.g. its dense twin) on ``tasks``; write ``out/``:
    ``eval.json`` (the table), ``eval.md``, ``eval.png``, ``harness_{model,twin}.json`` (the
    harness's own results) and ``samples_{model,twin}.jsonl`` (per-item values).

    ``model`` and ``twin``: hub id, directory, ``organism:NAME`` or a loaded ModelHandle.
    ``include_path``: a directory of local task configs. ``heldout_text``: the text of
    ``heldout_ppl``. ``limit``: at most this many items per task (held-out blocks too).
    ``bootstrap_iters``: the harness's bootstrap resamples for perplexity errors (0: none).
    ``settings``: extra entries for the table's settings (e.g. the organism used).
    """
    names = task_names(tasks)
    harness_names = [name for name in names if name != HELDOUT]
    if limit is not None and limit < 1:
        raise InvalidArgument(f"limit must be a positive number of items, got {limit}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be positive, got {batch_size}")
    if HELDOUT in names and heldout_text is None:
        raise InvalidArgument(f"{HELDOUT} needs a text: pass a corpus (a text file, "
                              "organism:NAME or a directory with corpus.txt)")
    manager = task_manager(harness_names, include_path) if harness_names else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refs = {"model": model} | ({"twin": twin} if twin is not None else {})
    measures: dict[str, dict[tuple[str, str], Measure]] = {}
    models: dict[str, dict] = {}
    files: dict[str, str] = {}
    for role, ref in refs.items():
        models[role], measures[role], written = _measure_one(
            role, ref, harness_names, manager, heldout_text, out, limit=limit,
            batch_size=batch_size, bootstrap_iters=bootstrap_iters, block_size=block_size,
            device=device, dtype=dtype)
        files |= written
    if include_path is not None:
        files["tasks"] = str(include_path)
    label_models(models)
    table = EvalTable(models=models, rows=compare(measures, row_order(names, measures)),
                      settings={"tasks": names, "limit": limit, "batch_size": batch_size,
                                "bootstrap_iters": bootstrap_iters, "block_size": block_size,
                                "lm_eval_version": lm_eval_version() if harness_names else None,
                                **(settings or {})},
                      files=files)
    table.files |= {"json": str(out / "eval.json"), "markdown": str(out / "eval.md"),
                    "figure": str(out / "eval.png")}
    (out / "eval.md").write_text(table.to_markdown())
    plot_table(table, out / "eval.png")
    _write_json(out / "eval.json", table.to_dict())
    return table


def _measure_one(role: str, ref, harness_names: list[str], manager, text: str | None, out: Path,
                 *, limit, batch_size, bootstrap_iters, block_size, device, dtype
                 ) -> tuple[dict, dict[tuple[str, str], Measure], dict[str, str]]:
    """One model's (info, measures, files written); a model loaded here is freed after."""
    from memlens.model import ModelHandle, load_model

    handle = ref if isinstance(ref, ModelHandle) else load_model(str(ref), device=device,
                                                                 dtype=dtype)
    info = {"ref": str(handle.ref), "topk": getattr(handle.config, "topk", None)}
    measures: dict[tuple[str, str], Measure] = {}
    files: dict[str, str] = {}
    if harness_names:
        summary, got = run_harness(handle, harness_names, manager, limit=limit,
                                   batch_size=batch_size, bootstrap_iters=bootstrap_iters)
        measures |= got
        files[f"harness_{role}"] = _write_json(out / f"harness_{role}.json", summary)
    if text is not None:
        measures[(HELDOUT, "perplexity")] = heldout_measure(heldout_nll(
            handle, text, min(block_size, handle.max_length or block_size), limit=limit))
    files[f"samples_{role}"] = write_samples(out / f"samples_{role}.jsonl", measures)
    return info, measures, files


def label_models(models: dict[str, dict]) -> None:
    """Column labels: "TopK (k=64)" / "dense" when the models differ so, else their names."""
    for info in models.values():
        topk = info["topk"]
        info["label"] = f"TopK (k={topk['k']})" if topk else "dense"
    labels = [info["label"] for info in models.values()]
    if len(set(labels)) < len(labels):
        for info in models.values():
            info["label"] = Path(info["ref"]).name or info["ref"]
        if len({info["label"] for info in models.values()}) < len(models):
            for role, info in models.items():
                info["label"] = role


def row_order(names: list[str], measures: dict) -> list[tuple[str, str]]:
    """Rows in the order the tasks were asked for (others, e.g. a group's subtasks, after them),
    accuracies before perplexities, else in the harness's order."""
    seen: list[tuple[str, str]] = []
    for role_measures in measures.values():
        for key in role_measures:
            if key not in seen:
                seen.append(key)
    rank = {name: i for i, name in enumerate(names)}
    tasks = list(dict.fromkeys(task for task, _ in seen))  # the harness's order for the rest
    return sorted(seen, key=lambda key: (rank.get(key[0], len(rank) + tasks.index(key[0])),
                                         "perplexity" in key[1]))


def write_samples(path: Path, measures: dict[tuple[str, str], Measure]) -> str:
    """One JSON line per (task, item): the per-item value of each metric (NLLs for
    perplexities)."""
    rows: dict[tuple[str, int], dict] = {}
    for (task, metric), m in measures.items():
        for item, value in m.items.items():
            rows.setdefault((task, item), {"task": task, "item": item})[metric] = value
    path.write_text("".join(json.dumps(r) + "\n" for _, r in sorted(rows.items())))
    return str(path)


def _write_json(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return str(path)
