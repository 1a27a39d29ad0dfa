"""Tokens of prompts: where a subject sits, answers as they follow a prompt, padded batches.

    span = subject_span(tokenizer, "The Eiffel Tower is in", "Eiffel Tower")   # (1, 3)
    batch = encode(tokenizer, ["a b", "a b c"])                                # right-padded
    ids = answer_ids(tokenizer, "Toulouse is a city in", "France")            # [" France"]
    input_ids, mask = pad_rows([[5, 6], [7]], pad_id(tokenizer))              # any token rows

Every padded batch in memlens is made by :func:`pad_rows` (right, left, or aligned on a column).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memlens.errors import EmptyInput, InputTooLong, SubjectNotFound


@dataclass(frozen=True)
class Span:
    """Token positions [start, end) of a substring; ``last`` is the position of its last token."""

    start: int
    end: int

    @property
    def first(self) -> int:
        return self.start

    @property
    def last(self) -> int:
        return self.end - 1

    def as_list(self) -> list[int]:
        return [self.start, self.end]


def subject_span(tokenizer, prompt: str, subject: str, *, occurrence: int = 0) -> Span:
    """Token span of ``subject`` in ``prompt`` (its ``occurrence``-th appearance), via offsets.

    A token belongs to the subject when its character span overlaps the subject's, so a
    leading space merged into the first subject token (" Paris") is handled, as are subjects
    at the start, middle or end of the prompt. Zero-width tokens (a BOS) never count.
    """
    if not prompt or not prompt.strip():
        raise EmptyInput("the prompt is empty")
    if not subject or not subject.strip():
        raise EmptyInput(f"the subject is empty (prompt: {prompt!r})")
    char_start = -1
    for _ in range(occurrence + 1):
        char_start = prompt.find(subject, char_start + 1)
        if char_start < 0:
            raise SubjectNotFound(
                f"subject {subject!r} does not occur in prompt {prompt!r}"
                + (f" {occurrence + 1} times" if occurrence else "")
            )
    char_end = char_start + len(subject)
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    hits = [i for i, (s, e) in enumerate(encoding["offset_mapping"])
            if e > s and s < char_end and e > char_start]
    if not hits:
        raise SubjectNotFound(f"subject {subject!r} maps to no token of prompt {prompt!r}")
    return Span(hits[0], hits[-1] + 1)


@dataclass
class Batch:
    """Right-padded token ids with the index of each row's last real token."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    last: torch.Tensor  # (B,) position of each prompt's last token

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.last.to(device))


def encode(tokenizer, prompts: Sequence[str], *, max_length: int | None = None) -> Batch:
    """Tokenize ``prompts`` into one right-padded batch; errors name the offending prompt."""
    rows = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise EmptyInput(f"prompt {i} is empty")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if max_length is not None and len(ids) > max_length:
            raise InputTooLong(
                f"prompt {i} ({prompt[:60]!r}...) has {len(ids)} tokens; "
                f"the model's context is {max_length}"
            )
        rows.append(ids)
    input_ids, mask = pad_rows(rows, pad_id(tokenizer))
    last = torch.tensor([len(r) - 1 for r in rows])
    return Batch(input_ids, mask, last)


def pad_id(tokenizer) -> int:
    """The tokenizer's padding token id (0 when it has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_rows(rows: Sequence[Sequence[int]], pad: int, *, starts: Sequence[int] | None = None,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows in one batch: ``(input_ids, attention_mask)``, both (B, width) long.

    Row i occupies columns ``starts[i] .. starts[i] + len(rows[i]) − 1`` (default 0: right
    padding; ``width − len`` left-pads); ``pad`` fills the rest, where the mask is 0.
    ``width`` defaults to the narrowest batch that holds every row.

        pad_rows([[5, 6], [7]], 0)                       # [[5, 6], [7, 0]]
        pad_rows([[5, 6], [7]], 0, starts=[0, 1])        # [[5, 6], [0, 7]]
    """
    starts = [0] * len(rows) if starts is None else list(starts)
    if width is None:
        width = max(s + len(r) for s, r in zip(starts, rows, strict=True))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (start, ids) in enumerate(zip(starts, rows, strict=True)):
        input_ids[i, start: start + len(ids)] = torch.tensor(ids)
        mask[i, start: start + len(ids)] = 1
    return input_ids, mask

def target_ids(tokenizer, target: str, *, prefix_space: bool = True) -> list[int]:
    """Token ids of an answer as it follows a prompt (a leading space added when needed)."""
    if not target or not target.strip():
        raise EmptyInput("the target is empty")
    text = target if (not prefix_space or target.startswith(" ")) else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EmptyInput(f"target {target!r} tokenizes to nothing")
    return ids


def answer_ids(tokenizer, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as it continues ``prompt_text``, with a separating space.

    Tokenizes prompt and prompt + " " + target together and keeps the difference, so that
    byte-level BPE (" Paris") and SentencePiece ("▁Paris") tokenizers both get the tokens a
    model would emit; falls back to the stand-alone target tokens if the boundary merges.
    """
    target = target.strip()
    if not target:
        raise EmptyInput(f"the target after prompt {prompt_text!r} is empty")
    sep = "" if prompt_text.endswith((" ", "\n")) else " "
    head = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt_text + sep + target, add_special_tokens=True)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head):]
    return target_ids(tokenizer, target, prefix_space=bool(sep))
