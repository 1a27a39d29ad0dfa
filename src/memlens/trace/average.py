"""Average causal effects over many facts (Meng et al. 2022, §2.1, Fig. 2).

    facts = load_facts("known_facts.json")          # [{prompt, subject, attribute?}, ...]
    avg = average_trace(handle, facts, n=200)
    avg.aie["mlp"][GROUPS.index("last_subject")]    # AIE per layer at the last subject token
    avg.ate, avg.n_skipped_wrong
    avg.recall_site()                                # the summary the organisms report

Every token of every traced fact falls in one of six groups: the first, middle and last subject
token, the first token after the subject, further tokens, and the prompt's last token (a
one-token subject counts as both first and last subject token, as in the reference notebook;
so does a token that is both the first subsequent and the last token). The average indirect
effect AIE[kind][group, l] is the mean over all tokens of the group of
IE = p_restored − p_corrupted (each token with its own fact's p_corrupted); the average total
effect ATE is the mean of p_clean − p_corrupted over facts. Facts whose ``attribute`` is not the
model's top next token are skipped and counted (the paper traces only known facts), as are
facts whose subject is not in the prompt.

A group no traced fact has a token of (no middle subject token when every subject is one or two
tokens; nothing at all when no fact was traced) has NaN AIE. ``aie`` keeps those NaN rows, so
the arrays stay numeric for plots and arithmetic; the JSON (``to_json``, ``trace_avg.json``)
writes such a row as one ``{"value": null, "reason": ...}`` (:mod:`memlens.missing`) in place of
its list of per-layer values, ``recall_site`` and ATE/p_clean/p_corrupted likewise, so every
number in the JSON is a number or says why it is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlens.cache import cache_dir
from memlens.errors import EmptyInput, InvalidArgument, MemlensError, SubjectNotFound
from memlens.files import check_unicode, read_text
from memlens.missing import explain, missing
from memlens.tokens import target_ids
from memlens.trace.noise import NoiseArg, resolve_noise
from memlens.trace.runs import TraceResult, trace_fact
from memlens.trace.sites import KINDS, check_kinds, default_window

if TYPE_CHECKING:
    from memlens.model import ModelHandle

GROUPS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further",
          "last")
GROUP_LABELS = ("First subject token", "Middle subject tokens", "Last subject token",
                "First subsequent token", "Further tokens", "Last token")


def load_facts(path: str | Path) -> list[dict[str, str]]:
    """Facts from a JSON list: known-facts format ({prompt, subject, attribute}; the published
    ``known_1000.json`` as is, its ``relation_id`` read as the relation) or CounterFact
    ({requested_rewrite: {prompt, subject, target_true: {str}}}); "{}" in a prompt is filled
    with the subject."""
    path = Path(path)
    try:
        records = json.loads(read_text(path, "facts file"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MemlensError(f"cannot read facts from {path}: {exc}") from None
    if not isinstance(records, list):
        raise MemlensError(f"{path} must hold a JSON list of facts")
    facts = []
    for i, record in enumerate(records):
        rewrite = record.get("requested_rewrite", record) if isinstance(record, dict) else None
        if not isinstance(rewrite, dict):
            raise MemlensError(f"fact {i} of {path} must be a JSON object with prompt and "
                               f"subject, got {record!r:.200}")
        prompt, subject = rewrite.get("prompt"), rewrite.get("subject")
        if not isinstance(prompt, str) or not isinstance(subject, str) or not prompt.strip() \
                or not subject.strip():
            raise MemlensError(f"fact {i} of {path} lacks a prompt or subject (non-empty "
                               f"strings): {record!r:.200}")
        true = rewrite.get("target_true")
        attribute = rewrite.get("attribute") or (true.get("str") if isinstance(true, dict)
                                                 else true)
        if attribute is not None and not isinstance(attribute, str):
            raise MemlensError(f"fact {i} of {path}: the attribute must be a string, got "
                               f"{type(attribute).__name__} {attribute!r:.80}")
        for text in (prompt, subject, attribute or ""):
            check_unicode(text, f"fact {i} of {path}:")
        fact = {"prompt": prompt.replace("{}", subject, 1), "subject": subject}
        if attribute:
            fact["attribute"] = attribute
        relation = record.get("relation") or record.get("relation_id")  # known_1000: relation_id
        if relation:
            fact["relation"] = str(relation)
        facts.append(fact)
    return facts


def select_facts(facts: Sequence[dict[str, str]], n: int | None = None,
                 relations: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The facts of `relations` (all if None), thinned to `n` spread evenly over the list.

    Fact files are usually grouped by relation, so the first N facts would all share one
    relation; an even spread keeps every relation's share. Raises EmptyInput, naming the
    relations that exist, when none matches.
    """
    facts = list(facts)
    if n is not None and n < 1:
        raise InvalidArgument(f"the number of facts (--n) must be ≥ 1, got {n}")
    if relations:
        wanted = set(relations)
        known = sorted({f.get("relation", "") for f in facts} - {""})
        facts = [f for f in facts if f.get("relation") in wanted]
        if not facts:
            raise EmptyInput(f"no facts of relation(s) {', '.join(sorted(wanted))}; the facts "
                             f"have: {', '.join(known) or 'no relation field'}")
    if n is not None and len(facts) > n:
        step = len(facts) / n
        facts = [facts[int(i * step)] for i in range(n)]
    return facts


def token_groups(n_tokens: int, subject_range: Sequence[int]) -> dict[str, list[int]]:
    """Token positions of each of the six groups for a prompt (see module docstring)."""
    first_e, end_e = int(subject_range[0]), int(subject_range[1])
    last_e, last = end_e - 1, n_tokens - 1
    groups = {
        "first_subject": [first_e],
        "middle_subject": list(range(first_e + 1, last_e)),
        "last_subject": [last_e],
        "first_subsequent": [end_e] if end_e <= last else [],
        "further": list(range(end_e + 1, last)),
        "last": [last],
    }
    return groups


@dataclass
class AverageTrace:
    """Average indirect effects (per kind: GROUPS × layers) and total effect over facts."""

    kinds: list[str]
    n_layers: int
    aie: dict[str, np.ndarray]  # kind → (len(GROUPS), n_layers)
    group_counts: dict[str, int]  # token instances per group
    ate: float  # mean p_clean − p_corrupted
    p_clean: float  # mean over facts
    p_corrupted: float
    n_facts: int  # facts traced
    n_skipped_wrong: int  # the model's top token was not the fact's attribute
    n_skipped_invalid: int  # subject not found in the prompt, or empty
    noise: float
    samples: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # prompt, subject, reason

    def effect(self, kind: str, group: str) -> np.ndarray:
        """AIE per layer of ``kind`` at token ``group``."""
        return self.aie[kind][GROUPS.index(group)]

    def untraced(self) -> str:
        """Why nothing could be averaged: how many facts were skipped, and why."""
        first = f" (first: {self.skipped[0]['reason']})" if self.skipped else ""
        return (f"no fact was traced: of {self.n_facts + len(self.skipped)} facts, the model "
                f"answered {self.n_skipped_wrong} wrongly and {self.n_skipped_invalid} were "
                f"invalid{first}")

    def group_reason(self, group: str) -> str:
        """Why the AIE at token ``group`` has no value (its count of tokens is 0)."""
        if self.n_facts == 0:
            return self.untraced()
        label = GROUP_LABELS[GROUPS.index(group)].lower()
        return f"no {label.removesuffix('s')} in any of the {self.n_facts} traced facts"

    def recall_site(self) -> dict[str, Any]:
        """Where recall happens: AIE at the last subject token and at the last token (max over
        layers, and that layer) for each kind, with TE and the fact counts.

            {"aie_last_subject_token": {"mlp": {"max": 0.21, "layer": 2}, ...},
             "aie_last_token": {...}, "te": 0.6, "n_facts": 200, "n_skipped": 3}

        The peak of a curve with no value (nothing traced) is ``missing(reason)`` as max and
        as layer, and so is TE.
        """
        def peak(group: str) -> dict[str, dict[str, Any]]:
            out = {}
            for kind in self.kinds:
                curve = self.effect(kind, group)
                if np.all(np.isnan(curve)):
                    out[kind] = dict.fromkeys(("max", "layer"), missing(self.group_reason(group)))
                else:
                    layer = int(np.nanargmax(curve))
                    out[kind] = {"max": float(curve[layer]), "layer": layer}
            return out

        return {
            "aie_last_subject_token": peak("last_subject"),
            "aie_last_token": peak("last"),
            "te": explain(self.ate, self.untraced()),
            "n_facts": self.n_facts,
            "n_skipped": self.n_skipped_wrong + self.n_skipped_invalid,
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``trace_avg.json``): the row of a group without tokens in ``aie``,
        and the means over no fact, are ``missing(reason)`` (see the module docstring)."""
        untraced = self.untraced()
        return {
            "kinds": self.kinds, "groups": list(GROUPS), "n_layers": self.n_layers,
            "aie": {k: [row.tolist() if self.group_counts[g] else missing(self.group_reason(g))
                        for g, row in zip(GROUPS, v, strict=True)]
                    for k, v in self.aie.items()},
            "group_counts": self.group_counts, "ate": explain(self.ate, untraced),
            "p_clean": explain(self.p_clean, untraced),
            "p_corrupted": explain(self.p_corrupted, untraced), "n_facts": self.n_facts,
            "n_skipped_wrong": self.n_skipped_wrong, "n_skipped_invalid": self.n_skipped_invalid,
            "noise": self.noise, "samples": self.samples, "skipped": self.skipped,
            "recall_site": self.recall_site(),
        }


def average_trace(handle: ModelHandle, facts: Sequence[dict[str, str]], *, n: int | None = None,
                  kinds: Sequence[str] = KINDS, samples: int = 10, noise: NoiseArg = None,
                  seed: int = 0, window: int | None = None, progress: bool = True,
                  resume: str | Path | None = None) -> AverageTrace:
    """Trace the first ``n`` facts (all if None) and average their effects per token group.

    ν is computed once over all the facts' subjects (unless ``noise`` gives it). With
    ``resume`` (a .jsonl path), each fact's trace is appended as it completes and facts already
    there are not traced again, so an interrupted run continues where it stopped.

        avg = average_trace(handle, load_facts("known_facts.json"), n=200)
        avg.recall_site()["aie_last_subject_token"]["mlp"]
    """
    kinds = check_kinds(kinds)
    facts = list(facts)[:n] if n is not None else list(facts)
    if not facts:
        raise EmptyInput("no facts to trace")
    spec = resolve_noise(handle, noise, [f["subject"] for f in facts if f.get("subject")])
    window = default_window(handle.n_layers) if window is None else window
    settings = json.dumps([handle.fingerprint(), kinds, samples, spec.scale, spec.dist, seed,
                           window])
    L = handle.n_layers
    sums = {k: np.zeros((len(GROUPS), L)) for k in kinds}
    counts = dict.fromkeys(GROUPS, 0)
    p_clean, p_corrupted = [], []

    def run(prompt: str, subject: str, fact: dict[str, str]) -> dict[str, Any]:
        return trace_fact(handle, prompt, subject, kinds=kinds, samples=samples, noise=spec,
                          seed=seed, window=window).to_json()

    runs = KnownFacts(handle, facts, run, label="tracing facts", progress=progress,
                      settings=settings, resume=resume)
    for data in runs:
        result = TraceResult.from_json(data)
        p_clean.append(result.p_clean)
        p_corrupted.append(result.p_corrupted)
        for g, (group, tokens) in enumerate(
                token_groups(len(result.tokens), result.subject_range).items()):
            counts[group] += len(tokens)
            for kind in kinds:
                sums[kind][g] += result.indirect_effect(kind)[tokens].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        aie = {k: sums[k] / np.array([counts[g] for g in GROUPS], dtype=float)[:, None]
               for k in kinds}
    return AverageTrace(
        kinds=list(kinds), n_layers=L, aie=aie, group_counts=counts,
        ate=_mean(p_clean) - _mean(p_corrupted), p_clean=_mean(p_clean),
        p_corrupted=_mean(p_corrupted), n_facts=len(p_clean),
        n_skipped_wrong=runs.n_skipped_wrong, n_skipped_invalid=runs.n_skipped_invalid,
        noise=spec.scale, samples=samples, skipped=runs.skipped,
    )


def extreme_layer(curve: np.ndarray, *, lowest: bool = False) -> tuple[int, float]:
    """The layer where ``curve`` (a value per layer, NaN where none) is highest (``lowest``:
    lowest) and the value there; ``(-1, nan)`` when every value is NaN."""
    if np.all(np.isnan(curve)):
        return -1, float("nan")
    layer = int(np.nanargmin(curve) if lowest else np.nanargmax(curve))
    return layer, float(curve[layer])


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def wrong_prediction(handle: ModelHandle, prompt: str, attribute: str | None) -> str | None:
    """Why the model does not know the fact, or None when its top next token after ``prompt``
    is the first token of ``attribute`` (with or without a leading space) or no attribute is
    given. Averages over facts skip the facts it does not know, as the paper does."""
    if not attribute:
        return None
    with torch.no_grad():
        top = int(handle.logits([prompt])[0, -1].argmax())
    expected = {target_ids(handle.tokenizer, attribute, prefix_space=space)[0]
                for space in (True, False)}
    if top in expected:
        return None
    return f"model predicts {handle.tokenizer.decode([top])!r}, not {attribute!r}"


def trace_cache(handle: ModelHandle) -> Path:
    """The shared resume file of ``handle``'s traced facts:
    ``$MEMLENS_HOME/traces/<fingerprint>.jsonl``. Records are keyed by the model, the settings
    and the fact, so runs with other settings share the file without colliding."""
    return cache_dir("traces") / f"{handle.fingerprint()}.jsonl"


def read_resume(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Records of a resume file (.jsonl, one ``{"key": ..., ...}`` per line) by key; a line cut
    by an interrupt is ignored, so its fact is computed again."""
    if path is None or not Path(path).is_file():
        return {}
    done = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interrupt: trace that fact again
            continue
        done[record.pop("key")] = record
    return done


def append_resume(path: str | Path | None, record: dict[str, Any]) -> None:
    """Append ``record`` as one line to the resume file ``path`` (nothing when None)."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def progress_bar(items: list, enabled: bool, label: str):
    """Iterate ``items``, with a rich progress bar labelled ``label`` when ``enabled``."""
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=label)


class KnownFacts:
    """``run`` on each fact the model knows, with a progress bar and an optional resume file;
    the other facts are skipped and counted. Iterating yields ``run``'s results in order, and
    fills the counts as it goes.

        runs = KnownFacts(handle, facts, lambda prompt, subject, fact: ..., label="tracing")
        for result in runs: ...
        runs.n_skipped_wrong, runs.n_skipped_invalid, runs.skipped

    A fact is skipped as *wrong* when :func:`wrong_prediction` says the model does not know it,
    as *invalid* when ``run(prompt, subject, fact)`` (prompt with "{}" filled with the subject)
    raises SubjectNotFound or EmptyInput. With ``resume`` (a .jsonl path), ``run`` returns
    JSON-ready data: each fact's record is appended under a key of ``settings`` (a string)
    and the fact, and a fact already there is not run again (:func:`read_resume`).
    """

    def __init__(self, handle: ModelHandle, facts: Sequence[dict[str, str]],
                 run: Callable[[str, str, dict[str, str]], Any], *, label: str,
                 progress: bool = True, settings: str = "",
                 resume: str | Path | None = None) -> None:
        self.handle, self.facts, self.run = handle, list(facts), run
        self.label, self.progress, self.settings, self.resume = label, progress, settings, resume
        self.n_skipped_wrong = 0  # the model's top token was not the fact's attribute
        self.n_skipped_invalid = 0  # subject not in the prompt, or empty
        self.skipped: list[dict[str, str]] = []  # prompt, subject, reason

    def __iter__(self) -> Iterator[Any]:
        done = read_resume(self.resume)
        for fact in progress_bar(self.facts, self.progress, self.label):
            key = None if self.resume is None else hashlib.sha256(
                json.dumps([self.settings, fact], sort_keys=True).encode()).hexdigest()
            record = done.get(key) or self._run_one(fact)
            if key not in done:
                append_resume(self.resume, {"key": key, **record})
            if "skipped" in record:
                self.n_skipped_wrong += record["skipped"] == "wrong"
                self.n_skipped_invalid += record["skipped"] != "wrong"
                self.skipped.append({"prompt": fact.get("prompt", ""),
                                     "subject": fact.get("subject", ""),
                                     "reason": record["reason"]})
                continue
            yield record["result"]

    def _run_one(self, fact: dict[str, str]) -> dict[str, Any]:
        """``{"result": ...}``, or why the fact is skipped: ``{"skipped": "wrong"|"invalid",
        "reason": ...}``."""
        prompt, subject = fact.get("prompt", ""), fact.get("subject", "")
        prompt = prompt.format(subject) if "{}" in prompt else prompt
        try:
            wrong = wrong_prediction(self.handle, prompt, fact.get("attribute"))
            if wrong:
                return {"skipped": "wrong", "reason": wrong}
            return {"result": self.run(prompt, subject, fact)}
        except (SubjectNotFound, EmptyInput) as exc:
            return {"skipped": "invalid", "reason": str(exc)}
