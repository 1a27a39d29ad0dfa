"""Paragraphs for memorization experiments: token ids cut to prefix + suffix length.

    paragraphs = load_paragraphs(handle)                         # the organism's paragraphs.jsonl
    paragraphs = load_paragraphs(handle, "texts.jsonl")          # {"text": ...} or {"token_ids": ...}
    paragraphs = load_paragraphs(handle, "corpus.txt")           # blank-line separated paragraphs
    paragraphs = load_paragraphs(handle, "hf:wikitext:wikitext-2-raw-v1:test")  # needs `datasets`
    ids = paragraph_tensor(paragraphs)                           # (N, prefix_len + suffix_len)

Every paragraph is cut to exactly ``prefix_len + suffix_len`` tokens (Stoehr et al.: 50 + 50);
a shorter one is an error that names it, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlens.errors import EmptyInput, InputTooLong, InvalidArgument, MemlensError
from memlens.files import read_text

PREFIX_LEN = 50  # tokens the model is prompted with
SUFFIX_LEN = 50  # tokens it must reproduce greedily to count as memorized


class ParagraphTooShort(MemlensError):
    """A paragraph has fewer tokens than prefix_len + suffix_len."""


class CorpusNotFound(MemlensError):
    """No paragraph source was given and the model has no paragraphs.jsonl next to it."""


@dataclass
class Paragraph:
    """One paragraph: its id, exactly prefix_len + suffix_len token ids, and how often it was
    seen in training (``repeats``, known for organisms only)."""

    id: str
    token_ids: list[int]
    text: str = ""
    repeats: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "token_ids": self.token_ids,
                "repeats": self.repeats}


def paragraph_tensor(paragraphs: list[Paragraph]) -> torch.Tensor:
    """Token ids of equally long paragraphs as one (N, prefix_len + suffix_len) LongTensor."""
    if not paragraphs:
        raise EmptyInput("no paragraphs given")
    return torch.tensor([p.token_ids for p in paragraphs], dtype=torch.long)


def load_paragraphs(
    handle,
    source: str | Path | None = None,
    *,
    prefix_len: int = PREFIX_LEN,
    suffix_len: int = SUFFIX_LEN,
    limit: int | None = None,
) -> list[Paragraph]:
    """Read paragraphs from ``source`` and cut each to ``prefix_len + suffix_len`` tokens.

    ``source``: a ``.jsonl`` file (one object per line with ``token_ids`` or ``text``, optional
    ``id`` and ``repeats``), a text file (paragraphs separated by blank lines), ``hf:NAME[:CONFIG
    [:SPLIT]]`` for a Hugging Face dataset's ``text`` column (``datasets`` must be installed), or
    None for ``paragraphs.jsonl`` in the model's directory (every organism has one).

    Example::

        paragraphs = load_paragraphs(handle, "my_paragraphs.txt", prefix_len=32, suffix_len=32)
    """
    if prefix_len < 1 or suffix_len < 1:
        raise InvalidArgument(f"prefix_len and suffix_len must be ≥ 1, got {prefix_len}, {suffix_len}")
    records = _read_records(handle, source)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise EmptyInput(f"the corpus {_describe(handle, source)} holds no paragraphs")
    need = prefix_len + suffix_len
    context = handle.max_length
    if context is not None and need > context:
        raise InputTooLong(f"prefix_len + suffix_len = {need} tokens exceed the model's context "
                           f"of {context} tokens")
    vocab = int(handle.model.config.vocab_size)
    out = []
    for i, record in enumerate(records):
        pid = str(record.get("id", i))
        if record.get("token_ids") is not None:
            ids = [int(t) for t in record["token_ids"]]
        else:
            text = record.get("text") or ""
            ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            preview = (record.get("text") or handle.tokenizer.decode(ids[:15]))[:60]
            raise ParagraphTooShort(
                f"paragraph {pid!r} ({preview!r}...) has {len(ids)} tokens; prefix_len + "
                f"suffix_len = {prefix_len} + {suffix_len} = {need} are needed"
            )
        bad = [t for t in ids[:need] if not 0 <= t < vocab]
        if bad:
            raise MemlensError(f"paragraph {pid!r} has token id {bad[0]} outside the model's "
                               f"vocabulary of {vocab}: was it tokenized for another model?")
        ids = ids[:need]
        out.append(Paragraph(id=pid, token_ids=ids, text=handle.tokenizer.decode(ids),
                             repeats=record.get("repeats")))
    return out


def _describe(handle, source) -> str:
    return repr(str(source)) if source is not None else f"of model {handle.ref!r}"


def _read_records(handle, source: str | Path | None) -> list[dict[str, Any]]:
    if source is None:
        directory = getattr(handle, "source_dir", None)
        path = Path(directory) / "paragraphs.jsonl" if directory else None
        if path is None or not path.is_file():
            raise CorpusNotFound(
                f"model {handle.ref!r} has no paragraphs.jsonl; pass a corpus (--corpus FILE, "
                "a .jsonl/.txt file or hf:DATASET)"
            )
        return _read_jsonl(path)
    text = str(source)
    if text.startswith("hf:"):
        return _read_hf(text)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CorpusNotFound(f"corpus file {text!r} does not exist")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    blocks = [b.strip() for b in read_text(path, "corpus").split("\n\n")]
    return [{"id": i, "text": b} for i, b in enumerate(blocks) if b]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(read_text(path, "corpus").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemlensError(f"{path}:{n} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or ("text" not in record and "token_ids" not in record):
            raise MemlensError(f"{path}:{n} needs an object with 'text' or 'token_ids'")
        records.append(record)
    return records


def _read_hf(spec: str) -> list[dict[str, Any]]:
    parts = spec.removeprefix("hf:").split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (
        parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise MemlensError(f"{spec!r} needs the `datasets` package: pip install datasets") from None
    data = datasets.load_dataset(name, config, split=split)
    if "text" not in data.column_names:
        raise MemlensError(f"dataset {name!r} has no 'text' column (columns: {data.column_names})")
    return [{"id": i, "text": t} for i, t in enumerate(data["text"]) if t and t.strip()]
