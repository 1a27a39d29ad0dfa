"""The quality report of a model organism (``memlens organism eval``): does the science show?

    report = evaluate_organism(path)                  # fact / paraphrase acc., memorization
    report = evaluate_organism(path, recall_site=True)  # + where facts are recalled (a trace)

First-token accuracy on the organism's facts (training and held-out templates) and on the
CounterFact paraphrase prompts; the fraction of paragraphs memorized (EM 50/50) per number of
repeats; and, on request, the recall site from memlens' averaged causal trace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memlens.cache import cache_dir
from memlens.missing import explain, missing
from memlens.organisms import corpus as C
from memlens.organisms.build import (
    PARAGRAPH_TOKENS,
    PREFIX_TOKENS,
    first_token,
    next_token_predictions,
)


def fact_accuracy(model, tok, facts, heldout: bool = False, n_templates: int = 0) -> float:
    """First-token greedy accuracy of the true object over all facts × (the trained or the
    held-out) templates; `n_templates` as in `FactConfig.n_train_templates`."""
    prompts, answers = [], []
    for f in facts:
        ts = (C.heldout_templates(f.relation) if heldout
              else C.train_templates(f.relation, n_templates))
        for t in ts:
            prompts.append(t.format(f.subject))
            answers.append(first_token(tok, f.object))
    preds = next_token_predictions(model, tok, prompts)
    return sum(p == a for p, a in zip(preds, answers, strict=True)) / max(1, len(answers))


def paraphrase_accuracy(model, tok, cases: list[dict]) -> float:
    """First-token accuracy of target_true on the CounterFact paraphrase prompts."""
    prompts, answers = [], []
    for c in cases:
        a = first_token(tok, c["requested_rewrite"]["target_true"]["str"])
        for p in c["paraphrase_prompts"]:
            prompts.append(p)
            answers.append(a)
    preds = next_token_predictions(model, tok, prompts)
    return sum(p == a for p, a in zip(preds, answers, strict=True)) / max(1, len(answers))


def exact_match_lengths(model, paragraphs: list[dict], prefix: int = PREFIX_TOKENS,
                        batch_size: int = 64) -> list[int]:
    """EM per paragraph: number of greedy tokens after the `prefix`-token prefix that match the
    true continuation before the first mismatch (0..len - prefix)."""
    import torch

    dev = next(model.parameters()).device
    out: list[int] = []
    with torch.no_grad():
        for i in range(0, len(paragraphs), batch_size):
            ids = torch.tensor([p["token_ids"] for p in paragraphs[i:i + batch_size]], device=dev)
            n_new = ids.shape[1] - prefix
            gen = model.generate(ids[:, :prefix], attention_mask=torch.ones_like(ids[:, :prefix]),
                                 max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 pad_token_id=model.config.eos_token_id)[:, prefix:]
            match = (gen == ids[:, prefix:]).long()
            out += match.cumprod(1).sum(1).tolist()
    return out


def evaluate_organism(path: str | Path, recall_site: bool = False) -> dict:
    """The organism's quality report (see `memlens organism eval`).

    Keys: fact_accuracy, paraphrase_accuracy, memorized_fraction_by_repeats (repeats → fraction
    of paragraphs with EM = 50/50), n_facts, n_known_facts, n_params, train_seconds, recall_site.
    A value it cannot give (recall_site unless requested; n_known_facts and build_seconds of a
    build older than those fields) is ``missing(reason)`` (:mod:`memlens.missing`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memlens.trainer import TrainConfig  # noqa: F401 (threads)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = Path(path)
    meta = json.loads((path / "organism.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    facts = [C.Fact(**f) for f in json.loads((path / "facts.json").read_text())]
    cases = json.loads((path / "counterfact.json").read_text())
    paras = [json.loads(ln) for ln in (path / "paragraphs.jsonl").read_text().splitlines() if ln]
    ems = exact_match_lengths(model, paras)
    by_rep: dict[int, list[bool]] = {}
    for p, em in zip(paras, ems, strict=True):
        by_rep.setdefault(p["repeats"], []).append(em >= PARAGRAPH_TOKENS - PREFIX_TOKENS)
    report = {
        "name": meta["name"],
        "fact_accuracy": fact_accuracy(model, tok, facts,
                                       n_templates=meta["spec"]["facts"]["n_train_templates"]),
        "heldout_template_accuracy": fact_accuracy(model, tok, facts, heldout=True),
        "paraphrase_accuracy": paraphrase_accuracy(model, tok, cases),
        "memorized_fraction_by_repeats": {str(r): sum(v) / len(v) for r, v in sorted(by_rep.items())},
        "mean_em_by_repeats": {str(r): sum(em for p, em in zip(paras, ems, strict=True)
                                           if p["repeats"] == r) / len(v)
                               for r, v in sorted(by_rep.items())},
        "n_facts": len(facts),
        "n_known_facts": explain(meta.get("n_known_facts"), OLD_BUILD),
        "n_counterfact_cases": len(cases),
        "n_params": meta["n_params"],
        "train_seconds": meta["train_seconds"],
        "build_seconds": explain(meta.get("build_seconds"), OLD_BUILD),
        "final_loss": meta["final_loss"],
        "recall_site": explain(recall_site_report(path), "memlens.trace could not be imported")
        if recall_site else missing("not computed: pass recall_site=True (memlens organism "
                                    "eval --recall-site)"),
    }
    return report


OLD_BUILD = "not recorded in organism.json (built by an older memlens)"


def cached_evaluation(path: str | Path, fingerprint: str) -> dict:
    """:func:`evaluate_organism` of ``path`` (without the recall site), computed once per
    weights: kept in ``$MEMLENS_HOME/organism_eval/<fingerprint>.json`` (the fingerprint of
    the loaded model, :meth:`memlens.model.ModelHandle.fingerprint`), so a second demo run
    reads it instead of re-scoring every fact."""
    file = cache_dir("organism_eval") / f"{fingerprint}.json"
    if file.is_file():
        return json.loads(file.read_text())
    report = evaluate_organism(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, file)
    return report


def recall_site_report(path: str | Path, n_facts: int = 100, *, samples: int = 10,
                       progress: bool = False, out_json: str | Path | None = None) -> dict | None:
    """Where the organism recalls facts: memlens' averaged causal trace over `n_facts` known
    facts, spread evenly over relations (issue 10).

    Returns `AverageTrace.recall_site()` — {aie_last_subject_token: {hidden|mlp|attn: {max,
    layer}}, aie_last_token: {...}, te, n_facts, n_skipped} — plus `te_fraction_last_subject`
    (hidden AIE at the last subject token / TE; `missing(reason)` when TE is 0 or no fact was
    traced). None when `memlens.trace` is unavailable.
    """
    try:
        from memlens.model import load_model
        from memlens.trace import average_trace, load_facts, select_facts, trace_cache
    except ImportError:
        return None
    path = Path(path)
    facts = select_facts(load_facts(path / "known_facts.json"), n_facts)
    handle = load_model(str(path), device="cpu")
    avg = average_trace(handle, facts, samples=samples, progress=progress,
                        resume=trace_cache(handle))
    if out_json is not None:
        Path(out_json).write_text(json.dumps(avg.to_json(), indent=1, default=float))
    site = avg.recall_site()
    te, hidden = site["te"], site["aie_last_subject_token"]["hidden"]["max"]
    site["te_fraction_last_subject"] = (
        hidden / te if isinstance(hidden, float) and isinstance(te, float) and te else
        missing(avg.untraced() if avg.n_facts == 0 else "TE is 0: the corrupted subject does "
                "not lower P(answer), so no share of it can be attributed"))
    return site
