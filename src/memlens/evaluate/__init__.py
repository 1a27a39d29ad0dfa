"""Judging edits: CounterFact metrics, fluency (n-gram entropy), consistency (TF-IDF), zsRE accuracy.

    from memlens.evaluate import load_counterfact, evaluate_counterfact
    result = evaluate_counterfact(handle, load_counterfact(path, n=100), editor="rome")
    result.summary        # {"ES": {"pre": ..., "post": ...}, ...}
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
from memlens.evaluate.zsre import token_accuracy

__all__ = ["CounterFactCase", "CounterFactResult", "GenerationConfig", "ReferenceTexts", "TfIdf",
           "case_metrics", "evaluate_counterfact", "load_counterfact", "ngram_entropy",
           "token_accuracy"]
