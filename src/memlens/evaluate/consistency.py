"""Consistency RS: TF-IDF cosine between generations and reference texts about target_new.

    tfidf = TfIdf.fit(reference_sentences)
    tfidf.cosine(" ".join(generations), " ".join(texts_about_new_target))   # in [0, 1]
    refs = ReferenceTexts.for_data(handle, "counterfact.json")  # organism defaults

TF-IDF follows scikit-learn's defaults (lower-cased word tokens, smooth idf
ln((1+N)/(1+df)) + 1, L2-normalised rows), in numpy.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memlens.errors import MemlensError
from memlens.files import read_text

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def tfidf_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class TfIdf:
    """A fitted TF-IDF vocabulary: ``vector(text)`` is the L2-normalised tf·idf row."""

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray):
        self.vocabulary = vocabulary
        self.idf = idf

    @classmethod
    def fit(cls, documents: Iterable[str]) -> TfIdf:
        docs = [set(tfidf_tokens(d)) for d in documents]
        df = Counter(t for d in docs for t in d)
        vocabulary = {t: i for i, t in enumerate(sorted(df))}
        n = len(docs)
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in vocabulary])
        return cls(vocabulary, idf)

    def vector(self, text: str) -> np.ndarray:
        row = np.zeros(len(self.vocabulary))
        for token, count in Counter(tfidf_tokens(text)).items():
            index = self.vocabulary.get(token)
            if index is not None:
                row[index] = count * self.idf[index]
        norm = np.linalg.norm(row)
        return row / norm if norm > 0 else row

    def cosine(self, a: str, b: str) -> float:
        """cos(tfidf(a), tfidf(b)); 0 when either shares no word with the vocabulary."""
        return float(self.vector(a) @ self.vector(b))


class ReferenceTexts:
    """Texts about each object (target), from a JSON map or from corpus lines naming it."""

    def __init__(self, by_target: dict[str, list[str]] | None = None,
                 corpus_lines: Sequence[str] | None = None, source: str = ""):
        self.by_target = by_target or {}
        self.corpus_lines = list(corpus_lines or [])
        self.source = source
        self._tfidf: TfIdf | None = None

    @classmethod
    def load(cls, path: str | Path) -> ReferenceTexts:
        """``reference_texts.json`` ({target: [texts]}) or a text corpus (one text a line)."""
        path = Path(path)
        if not path.is_file():
            raise MemlensError(f"reference texts {str(path)!r} do not exist")
        if path.suffix == ".json":
            data = json.loads(read_text(path, "reference texts"))
            if not isinstance(data, dict):
                raise MemlensError(f"{path}: expected {{target: [texts, ...]}}")
            return cls(by_target={k: list(v) for k, v in data.items()}, source=str(path))
        lines = [x for x in read_text(path, "reference texts").splitlines() if x.strip()]
        return cls(corpus_lines=lines, source=str(path))

    @classmethod
    def for_data(cls, handle: Any, data_path: str | Path | None) -> ReferenceTexts | None:
        """Default references: reference_texts.json beside the data or the model, else the
        model's corpus.txt; None when there is neither."""
        places = [Path(data_path).parent] if data_path else []
        if handle.source_dir is not None:
            places.append(Path(handle.source_dir))
        for name in ("reference_texts.json", "corpus.txt"):
            for place in places:
                if (place / name).is_file():
                    return cls.load(place / name)
        return None

    def texts_for(self, target: str) -> list[str]:
        target = target.strip()
        if target in self.by_target:
            return self.by_target[target]
        pattern = re.compile(rf"(?<!\w){re.escape(target)}(?!\w)")
        return [line for line in self.corpus_lines if pattern.search(line)][:50]

    @property
    def tfidf(self) -> TfIdf:
        if self._tfidf is None:
            docs = [t for texts in self.by_target.values() for t in texts] or self.corpus_lines
            self._tfidf = TfIdf.fit(docs[:20000])
        return self._tfidf

    def score(self, generations: Sequence[str], target: str) -> float:
        """RS for one case: cosine of all generations vs all texts about ``target`` (NaN if
        there are no such texts)."""
        texts = self.texts_for(target)
        if not texts or not generations:
            return float("nan")
        return self.tfidf.cosine(" ".join(generations), " ".join(texts))
