"""Context templates: short texts the model generates itself, prefixed to a prompt so that k*
and v* hold across contexts (ROME §3.1: k* is averaged over ``"{ctx}. {subject}..."``).

    templates = context_templates(handle)      # ["{}", "The first of the. {}", ...]

The first template is always the bare ``"{}"``. Generated templates are cached on disk under
``$MEMLENS_HOME/context/`` keyed by the model fingerprint and the sampling settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from memlens.cache import cache_dir

DEFAULT_LENGTHS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (new tokens, how many)
_MEMORY: dict[str, list[str]] = {}


def context_templates(handle: Any, lengths: Sequence[Sequence[int]] = DEFAULT_LENGTHS, *,
                      seed: int = 0, prefix: str = "The", cache: bool = True) -> list[str]:
    """``["{}"]`` + one ``"<generated text>. {}"`` per sample: top-5 sampling from ``prefix``,
    ``count`` samples of ``n`` new tokens for each (n, count) in ``lengths``; seeded."""
    settings = json.dumps({"lengths": [list(x) for x in lengths], "seed": seed, "prefix": prefix})
    key = f"{handle.fingerprint()}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"
    if cache and key in _MEMORY:
        return list(_MEMORY[key])
    path = cache_dir("context") / f"{key}.json"
    if cache and path.is_file():
        templates = json.loads(path.read_text())
    else:
        templates = ["{}"] + [_as_template(text) for n, count in lengths
                              for text in _sample(handle, prefix, int(n), int(count), seed)]
        if cache:
            _write_atomic(path, json.dumps(templates, indent=1))
    _MEMORY[key] = templates
    return list(templates)


def _as_template(text: str) -> str:
    """A generated text as a template: braces removed (they would break ``format``)."""
    clean = " ".join(text.replace("{", " ").replace("}", " ").split())
    return f"{clean}. {{}}"


@torch.no_grad()
def _sample(handle: Any, prefix: str, n_tokens: int, count: int, seed: int) -> list[str]:
    tok = handle.tokenizer
    batch = handle.encode([prefix] * count)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + n_tokens)
        out = handle.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True,
            top_k=5, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=None,
        )
    return tok.batch_decode(out, skip_special_tokens=True)


def _write_atomic(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
