"""Fluency of generated text: weighted n-gram entropy GE (ROME §3.2, "generation entropy").

    ngram_entropy(["Toulouse is a city in France. It is ..."])    # bits

For each text, H_n = −Σ f log₂ f over the frequencies f of its word n-grams; the text's score
is the mean of the weighted entropies (2/3·H₂, 4/3·H₃), i.e. ½(2/3·H₂ + 4/3·H₃), exactly as the
reference ``n_gram_entropy`` computes it (its paper tables report this ×100); GE is the mean
over texts. Repetitive text ("the the the") scores low.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens: runs of letters/digits and single punctuation marks (as NLTK splits them)."""
    return _WORD.findall(text)


def entropy_of_ngrams(tokens: Sequence[str], n: int) -> float:
    """H_n in bits of the n-gram frequency distribution of ``tokens`` (0 if none)."""
    counts = Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                       weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """mean_i(weights[i] · H_{ns[i]}) of one text."""
    tokens = words(text)
    terms = [w * entropy_of_ngrams(tokens, n) for n, w in zip(ns, weights, strict=True)]
    return sum(terms) / len(terms)


def ngram_entropy(texts: Sequence[str]) -> float:
    """GE: the mean over ``texts`` of :func:`text_ngram_entropy`."""
    if not texts:
        return float("nan")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)
