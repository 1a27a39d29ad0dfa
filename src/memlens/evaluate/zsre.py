"""zsRE-style accuracy: teacher-forced top-1 token accuracy of an answer (MEND/ROME's metric).

    token_accuracy(handle, ["What country is Toulouse in?"], "France")   # in [0, 1]
    cases = load_zsre("zsre_mem_eval.json")     # the published evaluation file, as is
    zsre_metrics(handle, cases)                 # efficacy, paraphrase, specificity
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memlens.edit.requests import EditRequest
from memlens.errors import MemlensError
from memlens.files import read_text
from memlens.scoring import score_targets


def token_accuracy(handle: Any, prompts: Sequence[str], target: str) -> float:
    """Fraction of ``target``'s tokens that are the model's argmax after each prompt (and the
    target's earlier tokens), averaged over prompts."""
    if not prompts:
        return float("nan")
    scores = score_targets(handle, prompts, [target] * len(prompts))
    return sum(sum(s.hits) / len(s.hits) for s in scores) / len(scores)


# ── the published zsRE evaluation file ──────────────────────────────────────


@dataclass
class ZsRECase:
    """One record of the published ``zsre_mem_eval.json`` (MEND/ROME): the edit request
    (question ``src`` with the subject as ``{}`` → ``alt``), its paraphrase (``rephrase``) and
    an unrelated Natural Questions probe (``loc`` → ``loc_ans``) that must not change."""

    request: EditRequest
    paraphrase_prompts: list[str]
    loc: str
    loc_ans: str
    answers: list[str]

    @classmethod
    def from_record(cls, record: dict[str, Any], index: int) -> ZsRECase:
        if not isinstance(record, dict):
            raise MemlensError(f"zsRE record {index} must be a JSON object")
        missing = [k for k in ("subject", "src", "alt", "rephrase", "loc", "loc_ans")
                   if k not in record]
        if missing:
            raise MemlensError(f"zsRE record {index} lacks {missing} (keys: {sorted(record)})")
        rephrase = record["rephrase"]
        return cls(request=EditRequest.from_zsre(record, index=index),
                   paraphrase_prompts=[rephrase] if isinstance(rephrase, str) else list(rephrase),
                   loc=str(record["loc"]), loc_ans=str(record["loc_ans"]),
                   answers=[str(a) for a in record.get("answers") or []])


def load_zsre(path: str | Path, n: int | None = None) -> list[ZsRECase]:
    """The first ``n`` (all if None) cases of a zsRE evaluation JSON (``zsre_mem_eval.json``:
    a list of {subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond}), read as
    published.

        cases = load_zsre("zsre_mem_eval.json", n=100)
        zsre_metrics(handle, cases)          # {"efficacy": ..., "paraphrase": ..., ...}
    """
    path = Path(path)
    try:
        records = json.loads(read_text(path, "zsRE file"))
    except json.JSONDecodeError as exc:
        raise MemlensError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(records, list):
        raise MemlensError(f"{path}: expected a JSON list of zsRE records")
    records = records[:n] if n is not None else records
    return [ZsRECase.from_record(r, i) for i, r in enumerate(records)]


def zsre_metrics(handle: Any, cases: Sequence[ZsRECase]) -> dict[str, float]:
    """zsRE's three accuracies (ROME Table 2), teacher-forced top-1 token accuracy averaged
    over cases: efficacy (``alt`` after the question), paraphrase (``alt`` after the
    rephrased question) and specificity (``loc_ans`` after the unrelated ``loc`` question)."""
    if not cases:
        return {"efficacy": float("nan"), "paraphrase": float("nan"),
                "specificity": float("nan"), "n": 0}

    def mean(values: list[float]) -> float:
        values = [v for v in values if v == v]
        return sum(values) / len(values) if values else float("nan")

    return {
        "efficacy": mean([token_accuracy(handle, [c.request.text], c.request.target_new)
                          for c in cases]),
        "paraphrase": mean([token_accuracy(handle, c.paraphrase_prompts, c.request.target_new)
                            for c in cases]),
        "specificity": mean([token_accuracy(handle, [c.loc + "?"], c.loc_ans) for c in cases]),
        "n": len(cases),
    }


def evaluate_zsre(handle: Any, cases: Sequence[ZsRECase], *, editor: str = "none",
                  layer: int | None = None, hparams: Any = None, corpus: str | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """zsRE metrics before and after editing each case alone (undone before the next), with
    any editor of :data:`memlens.edit.editors.EDITORS` (``none``: pre-edit only).

        evaluate_zsre(handle, load_zsre("zsre_mem_eval.json", n=50), editor="rome")
        # {"setup": {...}, "pre": {"efficacy": ...}, "post": {...}}
    """
    from memlens.evaluate.counterfact import prepare_editor

    if not cases:
        raise MemlensError("no zsRE cases to evaluate")
    edit_fn, setup = prepare_editor(handle, editor, cases, layer=layer, hparams=hparams,
                                    corpus=corpus, progress=progress)
    pre = zsre_metrics(handle, cases)
    if edit_fn is None:
        return {"setup": setup, "pre": pre, "post": pre}
    per_case = []
    for case in cases:
        edit = edit_fn(handle, case.request)
        try:
            per_case.append(zsre_metrics(handle, [case]))
        finally:
            edit.undo()
    keys = ("efficacy", "paraphrase", "specificity")
    post = {k: sum(m[k] for m in per_case) / len(per_case) for k in keys}
    return {"setup": setup, "pre": pre, "post": {**post, "n": len(per_case)}}
