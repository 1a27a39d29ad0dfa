"""EleutherAI's lm-evaluation-harness on a model memlens loaded: per-item numbers, not just means.

    handle = load_model("runs/topk/topk")                 # TopK layers come back with it
    write_task("eval/tasks", "my_cloze", docs, "cloze")   # a harness task over a local JSONL
    tm = task_manager(["my_cloze"], include_path="eval/tasks")
    summary, measures = run_harness(handle, ["my_cloze"], tm, limit=100)
    measures[("my_cloze", "acc")].value, .stderr, .items  # mean, binomial s.e., item → 0/1
    heldout_measure(heldout_nll(handle, text))            # held-out token perplexity ± s.e.

The harness is the optional ``eval`` extra (``pip install 'memlens[eval]'``); without it
:func:`require_lm_eval` raises :class:`HarnessMissing`, one line with the install command. The
model reaches the harness wrapped in its ``HFLM`` class, so whatever memlens installed in it
(TopK activations, edits) is what the harness measures. Standard errors are the harness's
(``acc``: binomial; ``perplexity``: bootstrap over items); ``heldout_ppl`` (measured by memlens
itself, not a harness task) uses the delta method over blocks. The table of two models is
:mod:`memlens.evaluate.lm_table`; the whole run, files included, :mod:`memlens.evaluate.lm`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memlens.errors import InvalidArgument, MemlensError
from memlens.missing import explain, missing

#: Token perplexity on held-out corpus blocks, measured by memlens (not a harness task).
HELDOUT = "heldout_ppl"
#: What a local task asks of the model: one continuation's log-likelihood, or a choice.
TASK_KINDS = ("cloze", "multiple_choice")


class HarnessMissing(MemlensError):
    """lm-evaluation-harness (the ``eval`` extra) is not installed."""


def require_lm_eval():
    """The ``lm_eval`` module, or :class:`HarnessMissing` with the install command."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - needs accelerate too
    except ImportError as exc:
        raise HarnessMissing(
            "evaluating with lm-evaluation-harness needs the eval extra: pip install "
            f"'memlens[eval]' (lm-eval 0.4.x; import failed: {exc})") from None
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-eval version (e.g. ``0.4.13``)."""
    from importlib.metadata import version

    return version("lm-eval")


# ── local tasks: harness configs over JSONL files ───────────────────────────


def write_task(directory: str | Path, name: str, docs: list[dict], kind: str) -> Path:
    """Write harness task ``name`` over ``docs``: ``NAME.jsonl`` (the items) and ``NAME.yaml``
    (its config, ``dataset_path: json``) in ``directory``; return the config's path.

        write_task("eval/tasks", "my_cloze", [{"context": "Paris is in", "target": "France"}],
                   "cloze")
        TaskManager(include_path="eval/tasks")          # the harness now knows my_cloze

    ``kind="cloze"``: items ``{"context", "target"}``, LAMBADA-style (``acc``: every token of
    `` target`` is the greedy one; ``perplexity``: exp(−mean log p(target))).
    ``kind="multiple_choice"``: items ``{"context", "choices", "gold"}`` (``acc``, ``acc_norm``).
    """
    if kind not in TASK_KINDS:
        raise InvalidArgument(f"unknown task kind {kind!r}; kinds: {list(TASK_KINDS)}")
    need = {"context", "target"} if kind == "cloze" else {"context", "choices", "gold"}
    lacking = [i for i, doc in enumerate(docs) if not need <= set(doc)]
    if lacking:
        raise InvalidArgument(f"items {lacking[:5]} of task {name} lack one of {sorted(need)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    config = directory / f"{name}.yaml"
    config.write_text(_task_yaml(name, data.resolve(), kind))
    return config


def _task_yaml(name: str, data: Path, kind: str) -> str:
    """The harness config of a local task, as YAML (PyYAML comes with lm-eval's datasets;
    without it as JSON, which is YAML too)."""
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "context",
        "metadata": {"version": 1.0, "written_by": "memlens.evaluate.harness"},
    }
    if kind == "cloze":
        config |= {"output_type": "loglikelihood", "doc_to_target": "{{' ' + target}}",
                   "metric_list": [
                       {"metric": "perplexity", "aggregation": "perplexity",
                        "higher_is_better": False},
                       {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        config |= {"output_type": "multiple_choice", "doc_to_choice": "choices",
                   "doc_to_target": "gold",
                   "metric_list": [
                       {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                       {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    try:
        import yaml
    except ImportError:
        return json.dumps(config, indent=1) + "\n"
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def task_manager(names: list[str], include_path: str | Path | None = None):
    """The harness's ``TaskManager`` for ``names`` (its own tasks are indexed only when one of
    ``names`` is not a local task in ``include_path``); an unknown name is an error."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    local = {p.stem for p in Path(include_path).glob("*.yaml")} if include_path else set()
    defaults = any(name not in local for name in names)
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=defaults)
    check_known(names, manager.all_tasks)
    return manager


def check_known(names: list[str], known: list[str]) -> None:
    """:class:`InvalidArgument` naming the first of ``names`` not in ``known`` (with the
    closest known names)."""
    import difflib

    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(set(known) | {HELDOUT}), n=3)
            raise InvalidArgument(f"unknown task {name!r}" + (f"; did you mean {close}?" if close
                                                              else ""))


# ── one model ───────────────────────────────────────────────────────────────


@dataclass
class Measure:
    """One model's number for one (task, metric), with the per-item values behind it.

    ``kind`` says how ``items`` make ``value``: ``"mean"`` (value = mean of items, e.g. 0/1
    accuracies) or ``"nll"`` (value = exp(mean of items), items negative log-likelihoods);
    None when the items are unknown or make the value some other way.
    """

    value: Any  # float, or a missing() dict
    stderr: Any  # float, or a missing() dict
    n: int
    higher_is_better: bool
    source: str  # "harness" or "memlens"
    kind: str | None = None
    items: dict[int, float] = field(default_factory=dict, repr=False)  # item id → value


def run_harness(handle, tasks: list[str], manager, *, limit: int | None = None,
                batch_size: int = 32, bootstrap_iters: int = 10000) -> tuple[dict, dict]:
    """Run harness ``tasks`` (zero-shot) on a loaded model; return (the harness's result
    summary, {(task, metric): Measure}).

        summary, measures = run_harness(load_model("organism:tiny"), ["my_cloze"],
                                        task_manager(["my_cloze"], "eval/tasks"))
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "pretrained is not a str": we pass the loaded model on purpose
    try:
        lm = HFLM(pretrained=handle.model, tokenizer=handle.tokenizer, backend="causal",
                  batch_size=batch_size, max_length=handle.max_length)
    finally:
        quiet.setLevel(level)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its prints would spoil `--json` output
            result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                             limit=limit, bootstrap_iters=bootstrap_iters,
                                             log_samples=True)
    except (ConnectionError, OSError) as exc:
        text = str(exc).strip()
        raise MemlensError(f"the harness could not load the data of {', '.join(tasks)}: "
                           f"{text.splitlines()[0] if text else type(exc).__name__} (offline, "
                           "only local tasks and data sets in the datasets cache can run)"
                           ) from None
    summary = {key: result.get(key) for key in (
        "results", "n-samples", "higher_is_better", "versions", "n-shot", "config",
        "lm_eval_version", "transformers_version")}
    return summary, measures_of(result)


def measures_of(result: dict) -> dict[tuple[str, str], Measure]:
    """{(task, metric): Measure} of a ``simple_evaluate`` result (``log_samples=True`` gives
    the per-item values); a metric under a filter other than ``none`` is ``metric (filter)``."""
    out: dict[tuple[str, str], Measure] = {}
    samples = result.get("samples") or {}
    for task, res in result["results"].items():
        better = (result.get("higher_is_better") or {}).get(task, {})
        n = (result.get("n-samples") or {}).get(task, {}).get("effective", res.get("sample_len"))
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = res.get(f"{metric}_stderr,{filt}")
            items = {s["doc_id"]: s[metric] for s in samples.get(task, [])
                     if s.get("filter") == filt and isinstance(s.get(metric), int | float)}
            kind, items = _item_kind(float(value), items)
            out[(task, metric if filt == "none" else f"{metric} ({filt})")] = Measure(
                value=explain(float(value), "the harness returned no value"),
                stderr=stderr if isinstance(stderr, int | float) and not math.isnan(stderr)
                else missing("the harness gives no standard error for this metric "
                             "(bootstrap_iters=0, or too few items)"),
                n=int(n or len(items)), higher_is_better=bool(better.get(metric, True)),
                source="harness", kind=kind, items=items)
    return out


def _item_kind(value: float, items: dict[int, float]) -> tuple[str | None, dict[int, float]]:
    """How per-item values make ``value``: their mean, exp(−mean) (log-likelihoods, as the
    harness's ``perplexity``: returned as NLLs), or neither (no pairing then)."""
    if not items:
        return None, {}
    mean = sum(items.values()) / len(items)
    if math.isclose(mean, value, rel_tol=1e-6, abs_tol=1e-9):
        return "mean", items
    if -mean < 700 and math.isclose(math.exp(-mean), value, rel_tol=1e-6):
        return "nll", {i: -v for i, v in items.items()}
    return None, {}


@torch.no_grad()
def heldout_nll(handle, text: str, block_size: int = 128, heldout_fraction: float = 0.1,
                limit: int | None = None, batch_size: int = 16) -> list[float]:
    """Mean next-token NLL (nats) of each held-out block of ``text``: the blocks and the loss
    of :func:`memlens.topk.train.train_pair` (exp of their mean is its ``heldout_ppl``).

        losses = heldout_nll(handle, read_corpus_text("organism:facts-gpt2"))
    """
    from memlens.topk.data import text_blocks

    _, blocks = text_blocks(handle.tokenizer, text, block_size, heldout_fraction)
    if limit is not None:
        blocks = blocks[:limit]
    losses: list[float] = []
    for start in range(0, len(blocks), batch_size):
        x = blocks[start:start + batch_size].to(handle.device)  # (B, T)
        logits = handle.model(input_ids=x, attention_mask=torch.ones_like(x),
                              use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(  # (B, T-1)
            logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
        losses += nll.mean(-1).tolist()
    return losses


def heldout_measure(losses: list[float]) -> Measure:
    """Perplexity exp(mean loss) of held-out blocks, its standard error by the delta method."""
    n = len(losses)
    ppl = math.exp(sum(losses) / n)
    stderr = (ppl * statistics.stdev(losses) / math.sqrt(n) if n > 1
              else missing("one held-out block: no standard error"))
    return Measure(ppl, stderr, n, higher_is_better=False, source="memlens", kind="nll",
                   items=dict(enumerate(losses)))
