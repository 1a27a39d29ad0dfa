"""Judging edits: CounterFact metrics, fluency (n-gram entropy), consistency (TF-IDF), zsRE accuracy;
judging LMs with lm-evaluation-harness (``harness``, ``lm``, ``lm_table``; the ``eval`` extra).

    from memlens.evaluate import load_counterfact, evaluate_counterfact
    result = evaluate_counterfact(handle, load_counterfact(path, n=100), editor="rome")
    result.summary        # {"ES": {"pre": ..., "post": ...}, ...}
    from memlens.evaluate.lm import evaluate_lm   # harness tasks + held-out perplexity, ± s.e.
    table = evaluate_lm("gpt2", tasks=["lambada_openai"], limit=500, out="gpt2-eval")
"""

from memlens.evaluate.consistency import ReferenceTexts, TfIdf
from memlens.evaluate.counterfact import (
    CounterFactCase,
    CounterFactResult,
    GenerationConfig,
    case_metrics,
    evaluate_counterfact,
    load_counterfact,
)
from memlens.evaluate.fluency import ngram_entropy
from memlens.evaluate.zsre import ZsRECase, evaluate_zsre, load_zsre, token_accuracy, zsre_metrics

__all__ = ["CounterFactCase", "CounterFactResult", "GenerationConfig", "ReferenceTexts", "TfIdf",
           "ZsRECase", "case_metrics", "evaluate_counterfact", "evaluate_zsre", "load_counterfact",
           "load_zsre", "ngram_entropy", "token_accuracy", "zsre_metrics"]
