"""Edit requests: what to change ("{} is a city in", "Toulouse" → "Japan"), loaded and checked.

    req = EditRequest(prompt="{} is a city in", subject="Toulouse", target_new="Japan")
    reqs = load_requests("cf.json")             # flat requests or CounterFact records
    validate_request(handle, req)               # raises before any weight is touched

Every check that can fail (subject missing, empty target, target equal to the model's current
answer) runs here, BEFORE an editor changes weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memlens.errors import EmptyInput, MemlensError, SubjectNotFound
from memlens.files import check_unicode, read_text
from memlens.tokens import answer_ids, subject_span


class InvalidRequest(MemlensError):
    """An edit request is malformed or would not change anything."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt.format(subject)`` should be continued by ``target_new``.

    ``prompt`` holds one ``{}`` where the subject goes; a prompt without ``{}`` that contains
    the subject verbatim is accepted and templated at the subject's first occurrence.
    """

    prompt: str  # e.g. "{} is a city in"
    subject: str  # e.g. "Toulouse"
    target_new: str  # e.g. "Japan" (a leading space is added when the tokenizer needs one)
    target_true: str | None = None  # the current answer, if known ("France")
    case_id: int | str | None = None  # CounterFact case id, when loaded from a record

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidRequest(f"{name} of an edit request must be a string, got "
                                     f"{type(value).__name__} {value!r:.80}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise InvalidRequest(f"target_true of the request about {self.subject!r} must be a "
                                 f"string, got {type(self.target_true).__name__}")
        for name in ("prompt", "subject", "target_new", "target_true"):
            if getattr(self, name) is not None:
                check_unicode(getattr(self, name), f"{name} of an edit request")
        if not self.subject.strip():
            raise EmptyInput(f"the subject of request {self.describe()} is empty")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise EmptyInput(f"the prompt of the request about {self.subject!r} is empty")
        if "{}" not in self.prompt:
            if self.subject not in self.prompt:
                raise SubjectNotFound(
                    f"subject {self.subject!r} does not occur in prompt {self.prompt!r} "
                    "(write the prompt with '{}' where the subject goes)"
                )
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}", 1))
        if self.prompt.count("{}") != 1:
            raise InvalidRequest(f"prompt {self.prompt!r} must contain exactly one '{{}}'")
        try:
            filled = self.prompt.format(self.subject)
        except (ValueError, KeyError, IndexError):
            filled = None
        if filled != self.prompt.replace("{}", self.subject):
            raise InvalidRequest(f"prompt {self.prompt!r} may hold no braces besides the one "
                                 "'{}' where the subject goes")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EmptyInput(f"target_new of request {self.describe()} is empty")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in: "Toulouse is a city in"."""
        return self.prompt.format(self.subject)

    def describe(self) -> str:
        return f"[{self.prompt.replace('{}', self.subject)!s}] -> [{self.target_new!s}]"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, index: int | None = None) -> EditRequest:
        """Accept a flat request or a CounterFact record (``requested_rewrite`` with
        ``target_new: {"str": ...}``)."""
        where = f"request {index}" if index is not None else "request"
        if not isinstance(record, dict):
            raise InvalidRequest(f"{where} must be a JSON object, got {type(record).__name__}")
        body = record.get("requested_rewrite", record)
        if not isinstance(body, dict):
            raise InvalidRequest(f"{where}: requested_rewrite must be a JSON object, got "
                                 f"{type(body).__name__}")
        if "prompt" not in body and {"src", "subject", "alt"} <= body.keys():
            return cls.from_zsre(body, index=index)
        missing = [k for k in ("prompt", "subject", "target_new") if k not in body]
        if missing:
            raise InvalidRequest(f"{where} lacks {missing}; expected prompt, subject, target_new")
        return cls(
            prompt=body["prompt"],
            subject=body["subject"],
            target_new=_text(body["target_new"]),
            target_true=_text(body["target_true"]) if body.get("target_true") else None,
            case_id=record.get("case_id", body.get("case_id")),
        )


    @classmethod
    def from_zsre(cls, record: dict[str, Any], *, index: int | None = None) -> EditRequest:
        """A request from a published zsRE evaluation record (``zsre_mem_eval.json``: subject,
        src, alt, answers, rephrase, loc, loc_ans): the question ``src`` with the subject as
        ``{}``, ``target_new`` = ``alt``, ``target_true`` = the first of ``answers``."""
        where = f"zsRE record {index}" if index is not None else "zsRE record"
        src, subject, alt = record.get("src"), record.get("subject"), record.get("alt")
        if not all(isinstance(v, str) and v.strip() for v in (src, subject, alt)):
            raise InvalidRequest(f"{where}: src, subject and alt must be non-empty strings")
        if subject not in src:
            raise SubjectNotFound(f"{where}: subject {subject!r} does not occur in its question "
                                  f"{src!r}")
        answers = record.get("answers") or []
        true = answers[0] if isinstance(answers, list) and answers else None
        return cls(prompt=src.replace(subject, "{}", 1), subject=subject, target_new=alt,
                   target_true=true if isinstance(true, str) and true.strip() else None,
                   case_id=record.get("case_id", index))


def _text(value: Any) -> Any:
    """CounterFact stores targets as {"str": ..., "id": ...}; flat requests as strings."""
    return value.get("str") if isinstance(value, dict) else value


def coerce_request(request: EditRequest | dict[str, Any]) -> EditRequest:
    return request if isinstance(request, EditRequest) else EditRequest.from_dict(request)


def load_requests(path: str | Path) -> list[EditRequest]:
    """Requests from a JSON file (one object or a list) or JSONL (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"request file {str(path)!r} does not exist")
    text = read_text(path, "request file")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{path}: not valid JSON ({exc})") from None
    if not records:
        raise EmptyInput(f"{path} holds no requests")
    return [EditRequest.from_dict(r, index=i) for i, r in enumerate(records)]


@torch.no_grad()
def greedy_answer(handle, prompt_text: str, n_tokens: int) -> list[int]:
    """The model's greedy continuation of ``prompt_text`` (``n_tokens`` token ids)."""
    ids = handle.encode([prompt_text]).input_ids
    out: list[int] = []
    for _ in range(n_tokens):
        next_id = int(handle.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(next_id)
        ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
    return out


def validate_request(handle, request: EditRequest, *, check_current: bool = True) -> list[int]:
    """Check ``request`` against the model; return target_new's token ids.

    Raises SubjectNotFound (subject maps to no token), EmptyInput (target tokenizes to nothing)
    or InvalidRequest (target_new equals target_true or the model's current greedy answer).
    """
    tok = handle.tokenizer
    subject_span(tok, request.text, request.subject)
    new_ids = answer_ids(tok, request.text, request.target_new)
    if request.target_true is not None and request.target_true.strip() == request.target_new.strip():
        raise InvalidRequest(f"target_new equals target_true ({request.target_new!r}) in "
                             f"{request.describe()}: nothing to edit")
    if check_current:
        current = greedy_answer(handle, request.text, len(new_ids))
        if current == new_ids:
            raise InvalidRequest(
                f"the model already answers {request.target_new!r} to {request.text!r}: "
                "target_new must differ from the current answer"
            )
    return new_ids


def validate_requests(handle, requests: Sequence[EditRequest]) -> None:
    """Validate many requests; the error names the failing request's index."""
    for i, request in enumerate(requests):
        try:
            validate_request(handle, request)
        except MemlensError as exc:
            raise type(exc)(f"request {i}: {exc}") from None
