"""zsRE-style accuracy: teacher-forced top-1 token accuracy of an answer (MEND/ROME's metric).

    token_accuracy(handle, ["What country is Toulouse in?"], "France")   # in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memlens.scoring import score_targets


def token_accuracy(handle: Any, prompts: Sequence[str], target: str) -> float:
    """Fraction of ``target``'s tokens that are the model's argmax after each prompt (and the
    target's earlier tokens), averaged over prompts."""
    if not prompts:
        return float("nan")
    scores = score_targets(handle, prompts, [target] * len(prompts))
    return sum(sum(s.hits) / len(s.hits) for s in scores) / len(scores)
