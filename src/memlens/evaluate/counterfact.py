"""CounterFact evaluation (ROME §3.2): does an edit generalise, stay specific, stay fluent?

    cases = load_counterfact("organism:facts-gpt2")           # or a path to counterfact.json
    result = evaluate_counterfact(handle, cases[:100], editor="rome")
    result.summary["ES"]                                      # {"pre": 0.01, "post": 0.99}

Per prompt, the mean-token NLL of target_new and of target_true (teacher forced) decides
p_new > p_true. Per case: ES / PS = P[p_new > p_true] over rewrite / paraphrase prompts,
NS = P[p_true > p_new] over neighbourhood prompts; EM / PM = mean(p_new − p_true), NM =
mean(p_true − p_new) with p = exp(−NLL); Score = harmonic mean of ES, PS, NS (of the means
over cases). GE = n-gram entropy of generations (:mod:`memlens.evaluate.fluency`), RS = TF-IDF
consistency with texts about target_new (:mod:`memlens.evaluate.consistency`), ACC = zsRE-style
teacher-forced token accuracy of target_new on rewrite + paraphrase prompts.
With an editor, every case is edited alone and undone before the next; pre-edit numbers are
measured on the same cases, so they always stand beside the post-edit ones.

A metric a case cannot give (no paraphrase prompts, generation off, no reference texts, ...) is
``{"value": None, "reason": ...}`` in that case's record and in the summary
(:mod:`memlens.missing`); :func:`unavailable` says why, for one case or many.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memlens.edit.requests import EditRequest, InvalidRequest
from memlens.errors import MemlensError
from memlens.evaluate.consistency import ReferenceTexts
from memlens.evaluate.fluency import ngram_entropy
from memlens.files import read_text
from memlens.missing import explain, is_nan
from memlens.model import organism_file, organism_name
from memlens.scoring import generate, score_targets

SUMMARY_KEYS = ("n", "ES", "PS", "NS", "EM", "PM", "NM", "Score", "GE", "RS")
CASE_METRICS = ("ES", "PS", "NS", "EM", "PM", "NM", "ACC", "GE", "RS")
EditFn = Callable[[Any, EditRequest], Any]  # (handle, request) -> EditHandle with .undo()


@dataclass
class CounterFactCase:
    """One CounterFact record."""

    request: EditRequest  # prompt, subject, target_new, target_true (required here)
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    relation_id: str | None = None

    @property
    def case_id(self) -> Any:
        return self.request.case_id

    @classmethod
    def from_record(cls, record: dict[str, Any], index: int) -> CounterFactCase:
        if "requested_rewrite" not in record:
            raise MemlensError(f"CounterFact record {index} has no 'requested_rewrite' "
                               f"(keys: {sorted(record)})")
        request = EditRequest.from_dict(record, index=index)
        if request.target_true is None:
            raise MemlensError(f"CounterFact record {index} has no target_true")
        if request.case_id is None:
            request = EditRequest(request.prompt, request.subject, request.target_new,
                                  request.target_true, index)
        return cls(
            request=request,
            paraphrase_prompts=list(record.get("paraphrase_prompts", [])),
            neighborhood_prompts=list(record.get("neighborhood_prompts", [])),
            attribute_prompts=list(record.get("attribute_prompts", [])),
            generation_prompts=list(record.get("generation_prompts", [])),
            relation_id=record["requested_rewrite"].get("relation_id"),
        )


def resolve_data(data: str | Path | None, handle: Any = None) -> Path:
    """A CounterFact file: a path, ``organism:NAME``, or (None) the model's counterfact.json."""
    if data is None:
        if handle is None or handle.source_dir is None or \
                not (Path(handle.source_dir) / "counterfact.json").is_file():
            raise MemlensError("no CounterFact data given and the model has no counterfact.json; "
                               "pass --data FILE")
        return Path(handle.source_dir) / "counterfact.json"
    if organism_name(data) is not None:
        return organism_file(data, "counterfact.json")
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / "counterfact.json"
    if not path.is_file():
        raise MemlensError(f"CounterFact data {str(data)!r} does not exist")
    return path


def load_counterfact(data: str | Path, n: int | None = None,
                     shuffle: int | None = None) -> list[CounterFactCase]:
    """The first ``n`` (all if None) cases of a CounterFact JSON file (a list of records,
    public or organism schema), with relations taken in turn.

    Cases are read in round-robin order over their ``relation_id`` (order kept within a
    relation): organism files are grouped by relation, so "the first 100 cases" would otherwise
    all be ``city_country``. ``shuffle`` (a seed) takes them in a random order instead, the
    same for a seed: a random sample of a file whose subjects have several cases each (the
    organisms' four facts per country and person) rarely edits one subject twice, as the first
    cases in relation order would. ``case_id`` is kept, so results still name the file's cases.
    """
    path = resolve_data(data)
    try:
        records = json.loads(read_text(path, "CounterFact file"))
    except json.JSONDecodeError as exc:
        raise MemlensError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(records, list):
        raise MemlensError(f"{path}: expected a JSON list of CounterFact records")
    cases = _relations_in_turn([CounterFactCase.from_record(r, i) for i, r in enumerate(records)])
    if shuffle is not None:
        random.Random(shuffle).shuffle(cases)
    return cases[:n] if n is not None else cases


def _relations_in_turn(cases: list[CounterFactCase]) -> list[CounterFactCase]:
    """One case of each relation in turn (relations in order of first appearance)."""
    groups: dict[str | None, list[CounterFactCase]] = {}
    for case in cases:
        groups.setdefault(case.relation_id, []).append(case)
    columns = list(groups.values())
    return [column[i] for i in range(max(map(len, columns), default=0)) for column in columns
            if i < len(column)]


# ── one case ────────────────────────────────────────────────────────────────


@dataclass
class GenerationConfig:
    """How GE/RS generations are made (same seed before and after an edit)."""

    max_new_tokens: int = 50
    sample: bool = True  # top-k sampling as the reference's generate_fast; False: greedy
    top_k: int = 5
    seed: int = 0


DEFAULT_GENERATION = GenerationConfig()


def unavailable(cases: Sequence[CounterFactCase], *,
                generation: GenerationConfig | None = DEFAULT_GENERATION,
                references: ReferenceTexts | None = None) -> dict[str, str]:
    """Why each metric that none of ``cases`` can give is missing: {metric: reason}.

    PS/PM need paraphrase prompts, NS/NM neighbourhood prompts, GE generation prompts (with
    generation on), RS also reference texts that mention a case's target_new; Score needs ES,
    PS and NS. Metrics some case can give are not in the dict.
    """
    reasons: dict[str, str] = {}
    if not any(c.paraphrase_prompts for c in cases):
        reasons["PS"] = reasons["PM"] = "no paraphrase prompts in the evaluated case(s)"
    if not any(c.neighborhood_prompts for c in cases):
        reasons["NS"] = reasons["NM"] = "no neighborhood prompts in the evaluated case(s)"
    if generation is None:
        reasons["GE"] = reasons["RS"] = "generation is off (--no-generation)"
    elif not any(c.generation_prompts for c in cases):
        reasons["GE"] = reasons["RS"] = "no generation prompts in the evaluated case(s)"
    elif references is None:
        reasons["RS"] = ("no reference texts: pass --references, or put reference_texts.json "
                         "or corpus.txt beside the data or the model")
    elif not any(c.generation_prompts and references.texts_for(c.request.target_new)
                 for c in cases):
        reasons["RS"] = (f"no text in {references.source or 'the reference texts'} mentions "
                         "the new target of the evaluated case(s)")
    lacking = [k for k in ("ES", "PS", "NS") if k in reasons]
    if lacking:
        reasons["Score"] = f"Score needs ES, PS and NS; {lacking[0]}: {reasons[lacking[0]]}"
    return reasons


def bench_reasons(cases: Sequence[CounterFactCase], n: int, ge_cases: int) -> dict[str, str]:
    """Why a ``bench-edits`` point lacks a metric: ES/PS/NS/Score are measured on the first
    ``n`` of ``cases`` (the valid cases bench edits), GE on the generations of the first
    ``ge_cases`` of those (see :func:`memlens.studies.scaling.bench_edits`); {metric: reason} for
    those none can give."""
    reasons = {k: v for k, v in unavailable(cases[:n], generation=None).items()
               if k not in ("GE", "RS")}
    ge = unavailable(cases[:min(n, ge_cases)]).get("GE") if ge_cases else \
        "GE is off (ge_cases 0)"
    return reasons | ({"GE": ge} if ge else {})


def explain_metrics(values: dict[str, Any], keys: Sequence[str],
                    reasons: dict[str, str]) -> dict[str, Any]:
    """``values`` with each NaN among ``keys`` replaced by ``missing(reason)``."""
    return {**values, **{k: explain(values[k], reasons.get(k, _UNKNOWN.format(k)))
                         for k in keys if k in values}}


_UNKNOWN = "{} came out NaN with every input present (non-finite model outputs?)"


def case_metrics(handle: Any, case: CounterFactCase, *,
                 generation: GenerationConfig | None = DEFAULT_GENERATION,
                 references: ReferenceTexts | None = None) -> dict[str, Any]:
    """ES/PS/NS, EM/PM/NM, ACC, GE, RS of the model as it is now, for one case; a metric the
    case cannot give is ``missing(reason)`` (see :func:`unavailable`)."""
    req = case.request
    groups = {"rewrite": [req.text], "paraphrase": case.paraphrase_prompts,
              "neighborhood": case.neighborhood_prompts}
    prompts = [p for ps in groups.values() for p in ps]
    scores = score_targets(handle, prompts * 2,
                           [req.target_new] * len(prompts) + [req.target_true] * len(prompts))
    new, true = scores[: len(prompts)], scores[len(prompts):]
    out: dict[str, Any] = {"case_id": case.case_id}
    start = 0
    for name, ps in groups.items():
        pairs = [(new[i].nll, true[i].nll) for i in range(start, start + len(ps))]
        start += len(ps)
        sign = -1.0 if name == "neighborhood" else 1.0
        success = [(t > nw) if sign > 0 else (nw > t) for nw, t in pairs]
        magnitude = [sign * (math.exp(-nw) - math.exp(-t)) for nw, t in pairs]
        key = {"rewrite": "E", "paraphrase": "P", "neighborhood": "N"}[name]
        out[f"{key}S"] = _mean(success)
        out[f"{key}M"] = _mean(magnitude)
        out[f"{name}_nll"] = [[round(a, 4), round(b, 4)] for a, b in pairs]
    hits = [h for s in new[: 1 + len(case.paraphrase_prompts)] for h in s.hits]
    out["ACC"] = _mean(hits)
    if generation is not None and case.generation_prompts:
        texts = generate(handle, case.generation_prompts, max_new_tokens=generation.max_new_tokens,
                         sample=generation.sample, top_k=generation.top_k, seed=generation.seed)
        out["GE"] = ngram_entropy(texts)
        out["RS"] = references.score(texts, req.target_new) if references else float("nan")
        out["generations"] = texts
    else:
        out["GE"] = out["RS"] = float("nan")
    if any(is_nan(out[k]) for k in CASE_METRICS):
        out = explain_metrics(out, CASE_METRICS,
                              unavailable([case], generation=generation, references=references))
    return out


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# ── many cases ──────────────────────────────────────────────────────────────


@dataclass
class CounterFactResult:
    """Summary {metric: {pre, post}} + per-case records; JSON-serialisable via to_dict()."""

    summary: dict[str, dict[str, Any]]  # a metric no case gives: {"value": None, "reason"}
    extra: dict[str, Any]
    cases: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over the cases that give each metric (NaN when none does); Score = harmonic mean
    of ES, PS, NS."""
    out: dict[str, float] = {"n": float(len(records))}
    for key in CASE_METRICS:
        values = [r[key] for r in records
                  if isinstance(r.get(key), int | float) and not is_nan(r[key])]
        out[key] = _mean(values)
    parts = [out["ES"], out["PS"], out["NS"]]
    if any(p != p for p in parts):
        out["Score"] = float("nan")
    else:
        out["Score"] = 0.0 if min(parts) <= 0 else 3.0 / sum(1.0 / p for p in parts)
    return out


def prepare_editor(handle: Any, name: str, cases: Sequence[CounterFactCase], *,
                   layer: int | None = None, hparams: Any = None, corpus: str | None = None,
                   progress: bool = True) -> tuple[EditFn | None, dict[str, Any]]:
    """An edit function for one case at a time, by editor name (``none``, or a name of
    :data:`memlens.edit.editors.EDITORS`), and the setup it records. The layer(s) are chosen
    once (``layer``, the hparams', else a trace of the first cases) and the key statistics and
    context templates computed once, shared by every case."""
    if name == "none":
        return None, {"editor": "none"}
    from memlens.edit.editors import get_editor

    editor = get_editor(name)
    plan = editor.prepare(handle, [c.request for c in cases], layers=layer, hparams=hparams,
                          corpus=corpus, progress=progress)

    def edit_one(h: Any, request: EditRequest) -> Any:
        edits, _ = editor.apply(h, [request], plan)
        return edits[0]

    edit_one.__name__ = name
    return edit_one, plan.to_dict()


def evaluate_counterfact(
    handle: Any,
    cases: Sequence[CounterFactCase],
    *,
    editor: str | EditFn = "none",
    layer: int | None = None,
    hparams: Any = None,
    corpus: str | None = None,
    references: ReferenceTexts | None = None,
    generation: GenerationConfig | None = DEFAULT_GENERATION,
    progress: bool = True,
) -> CounterFactResult:
    """Pre- and post-edit CounterFact metrics, editing one case at a time (undo between).

        cases = load_counterfact("organism:facts-gpt2", n=100)
        result = evaluate_counterfact(handle, cases, editor="rome")
        result.summary["Score"]      # {"pre": ..., "post": ...}
    """
    if not cases:
        raise MemlensError("no CounterFact cases to evaluate")
    if isinstance(editor, str):
        edit_fn, setup = prepare_editor(handle, editor, cases, layer=layer, hparams=hparams,
                                        corpus=corpus, progress=progress)
    else:
        edit_fn, setup = editor, {"editor": getattr(editor, "__name__", "custom")}
    fingerprint = handle.fingerprint()
    records: list[dict[str, Any]] = []
    evaluated: list[CounterFactCase] = []
    pre_all: list[dict[str, Any]] = []
    post_all: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    bar = _bar(progress, len(cases), setup["editor"])
    try:
        for case in cases:
            pre = case_metrics(handle, case, generation=generation, references=references)
            post = pre
            log: dict[str, Any] = {}
            if edit_fn is not None:
                try:
                    edit = edit_fn(handle, case.request)
                except (InvalidRequest, MemlensError) as exc:
                    if not isinstance(exc, InvalidRequest) and \
                            handle.fingerprint(refresh=True) != fingerprint:
                        raise
                    skipped.append({"case_id": case.case_id, "reason": str(exc)})
                    if bar:
                        bar.advance()
                    continue
                try:
                    post = case_metrics(handle, case, generation=generation,
                                        references=references)
                    log = {"layer": edit.log.get("layer"),
                           "delta_norms": {str(k): v for k, v in edit.delta_norms.items()},
                           "v_star": edit.log.get("v_star")}
                finally:
                    edit.undo()
            records.append({"case_id": case.case_id, "request": case.request.to_dict(),
                            "pre": pre, "post": post, "edit": log})
            evaluated.append(case)
            pre_all.append(pre)
            post_all.append(post)
            if bar:
                bar.advance()
    finally:
        if bar:
            bar.close()
    if handle.fingerprint(refresh=True) != fingerprint:
        raise MemlensError("the model's weights differ after evaluation: an edit was not undone")
    if not records:
        raise MemlensError(f"every case was skipped; first reason: {skipped[0]['reason']}")
    reasons = unavailable(evaluated, generation=generation, references=references)
    keys = (*SUMMARY_KEYS, "ACC")
    pre_sum = explain_metrics(summarize(pre_all), keys, reasons)
    post_sum = explain_metrics(summarize(post_all), keys, reasons)
    summary = {k: {"pre": pre_sum[k], "post": post_sum[k]} for k in SUMMARY_KEYS}
    extra = {"ACC": {"pre": pre_sum["ACC"], "post": post_sum["ACC"]}, **setup,
             "n_requested": len(cases), "skipped": skipped,
             "references": references.source if references else None,
             "generation": asdict(generation) if generation else None}
    return CounterFactResult(summary=summary, extra=extra, cases=records)


def _bar(enabled: bool, total: int, editor: str):
    if not enabled:
        return None
    from memlens.stats import ProgressBar

    return ProgressBar(f"CounterFact ({editor})", total, 0)
