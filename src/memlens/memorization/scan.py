"""Scan paragraphs for memorization: exact-match length and suffix NLL of greedy continuations.

    paragraphs = load_paragraphs(handle)
    result = scan(handle, paragraphs)                  # batched greedy decoding with a KV cache
    result.table()                                     # MP / NMP counts by training repeats
    mp, nmp = result.split(paragraphs)                 # memorized / non-memorized paragraphs

Stoehr et al. 2024: prompt with the first ``prefix_len`` (50) tokens, decode ``suffix_len`` (50)
tokens greedily; EM = number of tokens that match the true suffix up to the first mismatch
(0–50); NLL = teacher-forced mean negative log-likelihood of the true suffix. A paragraph is
memorized (MP) when EM ≥ ``mp_min_em`` (default: all of the suffix) and non-memorized (NMP) when
EM ≤ ``nmp_max_em`` (default 10); the ones in between are neither.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlens.errors import InvalidArgument
from memlens.memorization.data import PREFIX_LEN, Paragraph, paragraph_tensor
from memlens.model import kv_cache_kwargs, kv_cache_of

NMP_MAX_EM = 10  # paper: non-memorized paragraphs reproduce at most 10 tokens


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, prefix_ids: torch.Tensor, n_new: int, *, use_cache: bool = True
) -> torch.Tensor:
    """Greedy continuation (N, n_new) of equally long prefixes (N, P), all rows at once.

    With ``use_cache`` the prefix is encoded once and each new token costs one position of
    compute (KV cache); without it every step re-runs the whole sequence (the slow reference).
    """
    device = next(model.parameters()).device
    ids = prefix_ids.to(device)
    out = model(input_ids=ids, use_cache=use_cache)
    tokens = [out.logits[:, -1].argmax(-1)]
    past = kv_cache_of(out) if use_cache else None
    for _ in range(n_new - 1):
        if use_cache:
            out = model(input_ids=tokens[-1][:, None], use_cache=True,
                        **kv_cache_kwargs(model, past))
            past = kv_cache_of(out)
        else:
            ids = torch.cat([ids, tokens[-1][:, None]], dim=1)
            out = model(input_ids=ids, use_cache=False)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1).cpu()


def exact_match_length(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """EM (N,): how many leading tokens of ``pred`` equal ``true`` before the first mismatch."""
    return (pred == true).long().cumprod(dim=1).sum(dim=1)


def suffix_token_nll(logits: torch.Tensor, ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Per-token NLL (N, S) of ``ids[:, prefix_len:]`` given logits (N, T, V) of ``ids``.

    Position t's logits predict token t + 1, so the suffix is scored by logits at
    ``prefix_len - 1 .. T - 2`` (49..98 for 100-token paragraphs).
    """
    logprobs = F.log_softmax(logits[:, prefix_len - 1:-1].float(), dim=-1)
    target = ids[:, prefix_len:].to(logits.device)
    return -logprobs.gather(-1, target[..., None])[..., 0]


@torch.no_grad()
def suffix_nll(model: nn.Module, ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Teacher-forced mean NLL (N,) of each row's suffix ``ids[:, prefix_len:]``."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), use_cache=False).logits
    return suffix_token_nll(logits, ids, prefix_len).mean(dim=1).cpu()


@dataclass
class Evaluation:
    """EM, suffix NLL and greedy continuation of a batch of paragraphs."""

    em: torch.Tensor  # (N,) exact-match length, 0..suffix_len
    nll: torch.Tensor  # (N,) mean NLL of the true suffix
    continuation: torch.Tensor  # (N, suffix_len) greedy tokens


def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    prefix_len: int = PREFIX_LEN,
    *,
    batch_size: int = 32,
    use_cache: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """EM, NLL and greedy continuations of paragraphs ``ids`` (N, prefix_len + suffix_len).

    Example::

        ev = evaluate(handle.model, paragraph_tensor(paragraphs), 50)
        ev.em.float().mean()
    """
    suffix_len = ids.shape[1] - prefix_len
    if suffix_len < 1:
        raise InvalidArgument(f"paragraphs have {ids.shape[1]} tokens: nothing after the "
                         f"{prefix_len}-token prefix")
    ems, nlls, conts = [], [], []
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start:start + batch_size]
        cont = greedy_continuation(model, chunk[:, :prefix_len], suffix_len, use_cache=use_cache)
        conts.append(cont)
        ems.append(exact_match_length(cont, chunk[:, prefix_len:]))
        nlls.append(suffix_nll(model, chunk, prefix_len))
        if on_batch is not None:
            on_batch(chunk.shape[0])
    return Evaluation(torch.cat(ems), torch.cat(nlls), torch.cat(conts))


@dataclass
class ScanRow:
    """One paragraph's scan result."""

    id: str
    em: int
    nll: float
    label: str  # "MP" | "NMP" | "between"
    repeats: int | None = None
    continuation: list[int] = field(default_factory=list, repr=False)


@dataclass
class ScanResult:
    """Per-paragraph EM / NLL and the MP / NMP split (serialises with :meth:`to_dict`)."""

    rows: list[ScanRow]
    prefix_len: int
    suffix_len: int
    mp_min_em: int
    nmp_max_em: int

    @property
    def mp_ids(self) -> list[str]:
        return [r.id for r in self.rows if r.label == "MP"]

    @property
    def nmp_ids(self) -> list[str]:
        return [r.id for r in self.rows if r.label == "NMP"]

    def split(self, paragraphs: list[Paragraph]) -> tuple[list[Paragraph], list[Paragraph]]:
        """The (memorized, non-memorized) paragraphs among ``paragraphs``, by id."""
        mp, nmp = set(self.mp_ids), set(self.nmp_ids)
        return [p for p in paragraphs if p.id in mp], [p for p in paragraphs if p.id in nmp]

    def table(self) -> list[dict[str, Any]]:
        """Counts per training-repeat group (``None`` when repeats are unknown)."""
        groups: dict[Any, list[ScanRow]] = {}
        for row in self.rows:
            groups.setdefault(row.repeats, []).append(row)
        out = []
        for repeats in sorted(groups, key=lambda r: (r is None, r or 0)):
            rows = groups[repeats]
            out.append({
                "repeats": repeats, "n": len(rows),
                "MP": sum(r.label == "MP" for r in rows),
                "NMP": sum(r.label == "NMP" for r in rows),
                "between": sum(r.label == "between" for r in rows),
                "mean_em": round(sum(r.em for r in rows) / len(rows), 2),
                "mean_nll": round(sum(r.nll for r in rows) / len(rows), 4),
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix_len": self.prefix_len, "suffix_len": self.suffix_len,
            "mp_min_em": self.mp_min_em, "nmp_max_em": self.nmp_max_em,
            "n_paragraphs": len(self.rows), "n_mp": len(self.mp_ids), "n_nmp": len(self.nmp_ids),
            "table": self.table(), "rows": [asdict(r) for r in self.rows],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def classify(em: int, mp_min_em: int, nmp_max_em: int) -> str:
    """"MP" when em ≥ mp_min_em, "NMP" when em ≤ nmp_max_em, else "between"."""
    if em >= mp_min_em:
        return "MP"
    return "NMP" if em <= nmp_max_em else "between"


def scan(
    handle,
    paragraphs: list[Paragraph],
    *,
    prefix_len: int = PREFIX_LEN,
    mp_min_em: int | None = None,
    nmp_max_em: int = NMP_MAX_EM,
    batch_size: int = 32,
    progress: bool = False,
) -> ScanResult:
    """EM and NLL of every paragraph and its MP / NMP label (batched, KV-cached decoding).

    ``mp_min_em`` defaults to the whole suffix (EM = 50 of 50).

    Example::

        result = scan(handle, load_paragraphs(handle))
        print(result.table())
    """
    ids = paragraph_tensor(paragraphs)
    suffix_len = ids.shape[1] - prefix_len
    mp_min_em = suffix_len if mp_min_em is None else mp_min_em
    if not 0 <= nmp_max_em < mp_min_em <= suffix_len:
        raise InvalidArgument(f"need 0 ≤ nmp_max_em ({nmp_max_em}) < mp_min_em ({mp_min_em}) ≤ "
                         f"suffix_len ({suffix_len})")
    with _progress(progress, "scan", len(paragraphs)) as advance:
        ev = evaluate(handle.model, ids, prefix_len, batch_size=batch_size, on_batch=advance)
    rows = [
        ScanRow(id=p.id, em=int(e), nll=round(float(n), 5), repeats=p.repeats,
                label=classify(int(e), mp_min_em, nmp_max_em), continuation=c.tolist())
        for p, e, n, c in zip(paragraphs, ev.em, ev.nll, ev.continuation, strict=True)
    ]
    return ScanResult(rows, prefix_len, suffix_len, mp_min_em, nmp_max_em)


class _progress:
    """A rich progress bar (or nothing) whose ``advance(n)`` counts paragraphs."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
