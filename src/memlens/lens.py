"""Logit lens and attribute rate (Geva et al. 2023, §5): does the subject's representation
already hold its attributes?

    attributes = load_attributes("facts.json")          # {subject: [attribute, ...]}
    result = lens_fact(handle, "Toulouse is a city in", "Toulouse", attributes["Toulouse"])
    result.rate["residual"][result.subject_range[1] - 1]   # (L,) at the last subject token
    result.top_at("residual", token=3, layer=5)         # the lens's top-k tokens there
    avg = average_lens(handle, load_facts("known_facts.json"), attributes, n=100)
    avg.peak()                                           # per kind: highest rate, its layer
    fig = plot_lens(result)                              # or plot_average_lens(avg)

**Lens.** For each layer l and position t, a vector x of one *kind* is read and projected to
the vocabulary through the model's final norm and unembedding, logits = E · norm(x):

| kind         | x                                                           |
|--------------|-------------------------------------------------------------|
| ``residual`` | the residual stream after block l (the block's output)      |
| ``mlp``      | the MLP's output in block l (what it adds to the stream)    |
| ``attn``     | the attention's output in block l                           |

At the last layer the residual kind is exactly what the model itself computes, so its lens
equals the model's logits.

**Attribute rate.** The attributes A of a subject are token ids: the first token of each
attribute string as it follows a prompt (with a leading space, see
:func:`memlens.tokens.target_ids`). The attribute rate at (l, t) is |top_k ∩ A| / k, the
share of the lens's k most likely tokens that are attributes of the subject. The paper uses
k = 50 of GPT-2's 50,257 tokens; here k is that share of the model's vocabulary, at least 5
(:func:`default_top_k`: 5 on the 2,048-token organisms). Attributes come from a user's
``{subject: [attribute, ...]}`` file or from a fact file (on organisms ``facts.json``: the
objects of all facts with that subject). ``chance`` = |A| / vocabulary size is the rate of k
random tokens. Averages over facts are per token group (:data:`memlens.trace.GROUPS`) and
layer; facts the model does not know, or whose subject has no attributes, are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlens.errors import EmptyInput, InputFileError, InvalidArgument
from memlens.hooks import capture
from memlens.tokens import subject_span, target_ids
from memlens.trace.average import GROUPS, KnownFacts, extreme_layer, token_groups

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from memlens.model import ModelHandle

KINDS = ("residual", "mlp", "attn")
KIND_LABELS = {"residual": "residual stream", "mlp": "MLP output", "attn": "attention output"}
KIND_COLOURS = {"residual": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
_HOOKS = {"residual": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
          "attn": "blocks.{}.hook_attn_out"}
#: Geva et al. read the top 50 of GPT-2's 50,257 tokens.
PAPER_TOP_K, PAPER_VOCAB, MIN_TOP_K = 50, 50257, 5


def default_top_k(vocab_size: int) -> int:
    """k: the paper's 50 of 50,257 tokens as a share of ``vocab_size``, between 5 and 50."""
    scaled = round(PAPER_TOP_K * vocab_size / PAPER_VOCAB)
    return min(vocab_size, max(MIN_TOP_K, min(PAPER_TOP_K, scaled)))


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """Validate lens kinds (any of :data:`KINDS`)."""
    out = tuple(dict.fromkeys(kinds))
    unknown = [k for k in out if k not in KINDS]
    if unknown or not out:
        raise InvalidArgument(f"unknown lens kind(s) {', '.join(unknown) or '(none)'}; expected "
                              f"any of {', '.join(KINDS)}")
    return out


# ── attributes ───────────────────────────────────────────────────────────────


def load_attributes(path: str | Path) -> dict[str, list[str]]:
    """Attributes per subject from a JSON file: ``{subject: [attribute, ...]}``, or a list of
    facts — organism ``facts.json`` ({subject, object}), known facts ({subject, attribute}) or
    CounterFact ({requested_rewrite: {subject, target_true: {str}}}) — grouped by subject."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"cannot read attributes from {path}: {exc}") from None
    if isinstance(data, dict):
        if not all(isinstance(v, list) and all(isinstance(a, str) for a in v)
                   for v in data.values()):
            raise InputFileError(f"{path} must map each subject to a list of attribute strings")
        return {str(s): list(v) for s, v in data.items()}
    if not isinstance(data, list):
        raise InputFileError(f"{path} must hold {{subject: [attributes]}} or a list of facts")
    out: dict[str, list[str]] = {}
    for i, record in enumerate(data):
        rewrite = record.get("requested_rewrite", record) if isinstance(record, dict) else {}
        subject = rewrite.get("subject")
        attribute = (rewrite.get("object") or rewrite.get("attribute")
                     or (rewrite.get("target_true") or {}).get("str"))
        if not subject or not attribute:
            raise InputFileError(f"fact {i} of {path} lacks a subject or an object/attribute: "
                                 f"{record!r:.200}")
        values = out.setdefault(subject, [])
        if attribute not in values:
            values.append(attribute)
    return out


def attribute_ids(tokenizer, attributes: Sequence[str]) -> list[int]:
    """Sorted distinct first tokens of ``attributes`` as they follow a prompt (leading space)."""
    return sorted({target_ids(tokenizer, a)[0] for a in attributes if a and a.strip()})


# ── the lens ─────────────────────────────────────────────────────────────────


def project(handle: ModelHandle, x: torch.Tensor) -> torch.Tensor:
    """Logits E · norm(x) of vectors ``x`` (..., d_model) through the model's final norm and
    unembedding."""
    model = handle.model
    return handle.arch.unembedding(model)(handle.arch.final_norm(model)(x))


def lens_logits(handle: ModelHandle, input_ids: torch.Tensor, kind: str = "residual"
                ) -> torch.Tensor:
    """Lens logits (L, T, vocab) of ``kind`` for one prompt's ``input_ids`` (1, T)."""
    (kind,) = check_kinds([kind])
    points = [_HOOKS[kind].format(layer) for layer in range(handle.n_layers)]
    with torch.no_grad(), capture(handle.model, points) as cache:
        handle.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        return project(handle, torch.stack([cache[p][0] for p in points]))


@dataclass
class LensResult:
    """Logit lens of one fact: ``top[kind]`` (T, L, k) token ids, ``rate[kind]`` (T, L)."""

    prompt: str
    subject: str
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]  # [first, last + 1)
    attributes: list[str]
    attribute_ids: list[int]  # A
    k: int
    vocab_size: int
    top: dict[str, np.ndarray] = field(default_factory=dict)  # kind → (T, L, k) ids, best first
    rate: dict[str, np.ndarray] = field(default_factory=dict)  # kind → (T, L)

    @property
    def chance(self) -> float:
        """|A| / vocabulary size: the attribute rate of k random tokens."""
        return len(self.attribute_ids) / self.vocab_size

    def top_at(self, kind: str, token: int, layer: int, tokenizer=None) -> list[int] | list[str]:
        """The lens's top-k token ids (decoded when ``tokenizer`` is given) at (token, layer)."""
        ids = [int(i) for i in self.top[kind][token, layer]]
        return [tokenizer.decode([i]) for i in ids] if tokenizer is not None else ids

    def to_json(self, tokenizer=None) -> dict[str, Any]:
        """A JSON-ready dict (``lens.json``); with ``tokenizer``, the decoded top tokens at
        the last subject token are added for reading."""
        data: dict[str, Any] = {
            "prompt": self.prompt, "subject": self.subject, "tokens": self.tokens,
            "input_ids": self.input_ids, "subject_range": list(self.subject_range),
            "attributes": self.attributes, "attribute_ids": self.attribute_ids, "k": self.k,
            "vocab_size": self.vocab_size, "chance": self.chance, "kinds": list(self.rate),
            "rate": {kind: r.tolist() for kind, r in self.rate.items()},
            "top": {kind: t.tolist() for kind, t in self.top.items()},
        }
        if tokenizer is not None:
            last = self.subject_range[1] - 1
            data["top_at_last_subject_token"] = {
                kind: [self.top_at(kind, last, layer, tokenizer) for layer in range(t.shape[1])]
                for kind, t in self.top.items()}
        return data


def lens_fact(handle: ModelHandle, prompt: str, subject: str, attributes: Sequence[str], *,
              k: int | None = None, kinds: Sequence[str] = KINDS) -> LensResult:
    """Logit lens of every layer and position of ``prompt``, per kind, and the attribute rate
    against ``attributes`` (strings; their first tokens form A). ``k``: top tokens read
    (default :func:`default_top_k`).

        result = lens_fact(handle, "Toulouse is a city in", "Toulouse", ["France", "Occitanie"])
        result.rate["mlp"][result.subject_range[1] - 1]     # MLP outputs' rate per layer
    """
    kinds = check_kinds(kinds)
    vocab = int(handle.config.vocab_size)
    k = default_top_k(vocab) if k is None else k
    if not 1 <= k <= vocab:
        raise InvalidArgument(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    span = subject_span(handle.tokenizer, prompt, subject)
    ids_a = attribute_ids(handle.tokenizer, attributes)
    if not ids_a:
        raise EmptyInput(f"no attributes given for subject {subject!r}")
    input_ids = handle.encode([prompt]).input_ids
    allowed = torch.tensor(ids_a, device=handle.device)
    top, rate = {}, {}
    for kind in kinds:
        logits = lens_logits(handle, input_ids, kind)  # (L, T, vocab)
        best = logits.topk(k, dim=-1).indices.transpose(0, 1)  # (T, L, k)
        top[kind] = best.cpu().numpy()
        rate[kind] = torch.isin(best, allowed).double().mean(dim=-1).cpu().numpy()
    ids = input_ids[0].tolist()
    return LensResult(
        prompt=prompt, subject=subject, tokens=[handle.tokenizer.decode([t]) for t in ids],
        input_ids=ids, subject_range=(span.start, span.end), attributes=list(attributes),
        attribute_ids=ids_a, k=k, vocab_size=vocab, top=top, rate=rate)


# ── many facts ───────────────────────────────────────────────────────────────


@dataclass
class AverageLens:
    """Mean attribute rate per kind, token group (:data:`GROUPS`) and layer, over facts."""

    kinds: list[str]
    n_layers: int
    k: int
    rate: dict[str, np.ndarray]  # kind → (len(GROUPS), n_layers)
    group_counts: dict[str, int]  # token instances per group
    chance: float  # mean |A| / vocabulary size over the facts
    n_facts: int
    n_skipped_wrong: int  # the model's top token was not the fact's attribute
    n_skipped_invalid: int  # subject not in the prompt, or no attributes for it
    skipped: list[dict[str, str]] = field(default_factory=list)

    def at(self, kind: str, group: str = "last_subject") -> np.ndarray:
        """Mean attribute rate per layer of ``kind`` at token ``group``."""
        return self.rate[kind][GROUPS.index(group)]

    def peak(self, group: str = "last_subject") -> dict[str, dict[str, float | int]]:
        """Per kind, the highest mean attribute rate at ``group`` and its layer."""
        return {kind: dict(zip(("layer", "rate"), extreme_layer(self.at(kind, group)),
                               strict=True))
                for kind in self.kinds}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``lens_avg.json``)."""
        return {
            "kinds": self.kinds, "groups": list(GROUPS), "n_layers": self.n_layers,
            "k": self.k, "rate": {kind: r.tolist() for kind, r in self.rate.items()},
            "group_counts": self.group_counts, "chance": self.chance, "n_facts": self.n_facts,
            "n_skipped_wrong": self.n_skipped_wrong,
            "n_skipped_invalid": self.n_skipped_invalid, "skipped": self.skipped,
            "peak_last_subject_token": self.peak("last_subject"),
            "peak_last_token": self.peak("last"),
        }


def average_lens(handle: ModelHandle, facts: Sequence[dict[str, str]],
                 attributes: Mapping[str, Sequence[str]], *, n: int | None = None,
                 k: int | None = None, kinds: Sequence[str] = KINDS,
                 progress: bool = True) -> AverageLens:
    """Attribute rates of the first ``n`` facts (all if None), averaged per token group.

    ``attributes`` maps each subject to its attribute strings (:func:`load_attributes`).

        avg = average_lens(handle, load_facts("known_facts.json"), load_attributes("facts.json"))
        avg.at("residual", "last_subject")      # (L,)
    """
    kinds = check_kinds(kinds)
    facts = list(facts)[:n] if n is not None else list(facts)
    if not facts:
        raise EmptyInput("no facts to read with the lens")
    vocab = int(handle.config.vocab_size)
    k = default_top_k(vocab) if k is None else k
    L = handle.n_layers
    sums = {kind: np.zeros((len(GROUPS), L)) for kind in kinds}
    counts = dict.fromkeys(GROUPS, 0)
    chances = []

    def run(prompt: str, subject: str, fact: dict[str, str]) -> LensResult:
        if not attributes.get(subject):
            raise EmptyInput(f"no attributes for subject {subject!r}")
        return lens_fact(handle, prompt, subject, attributes[subject], k=k, kinds=kinds)

    runs = KnownFacts(handle, facts, run, label="reading facts with the lens", progress=progress)
    for result in runs:
        chances.append(result.chance)
        for g, tokens in enumerate(token_groups(len(result.tokens),
                                                result.subject_range).values()):
            counts[GROUPS[g]] += len(tokens)
            for kind in kinds:
                sums[kind][g] += result.rate[kind][tokens].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = {kind: sums[kind] / np.array([counts[g] for g in GROUPS], dtype=float)[:, None]
                for kind in kinds}
    return AverageLens(
        kinds=list(kinds), n_layers=L, k=k, rate=rate, group_counts=counts,
        chance=float(np.mean(chances)) if chances else float("nan"), n_facts=len(chances),
        n_skipped_wrong=runs.n_skipped_wrong, n_skipped_invalid=runs.n_skipped_invalid,
        skipped=runs.skipped)


# ── figures ──────────────────────────────────────────────────────────────────


def _figure(width: float, height: float, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def plot_lens(result: LensResult, *, title: str = "") -> Figure:
    """One fact: the residual stream's attribute rate (tokens × layers, subject tokens marked
    ``*``) and, per kind, the rate at the last subject token by layer."""
    kinds = list(result.rate)
    shown = "residual" if "residual" in result.rate else kinds[0]
    n_tokens, n_layers = result.rate[shown].shape
    fig, (heat, lines) = _figure(4.0 + 0.3 * n_layers, 1.2 + 0.28 * n_tokens, ncols=2)
    image = heat.pcolormesh(result.rate[shown], cmap="Purples", vmin=0, vmax=1)
    heat.invert_yaxis()
    labels = [repr(t)[1:-1] + ("*" if result.subject_range[0] <= i < result.subject_range[1]
                               else "") for i, t in enumerate(result.tokens)]
    heat.set_yticks(np.arange(n_tokens) + 0.5, labels, fontsize=8)
    heat.set_xticks(np.arange(n_layers) + 0.5, list(range(n_layers)))
    heat.set_xlabel("layer")
    heat.set_title(f"attribute rate, {KIND_LABELS[shown]} (top {result.k})", fontsize=9)
    fig.colorbar(image, ax=heat)
    last = result.subject_range[1] - 1
    for kind in kinds:
        lines.plot(np.arange(n_layers), result.rate[kind][last], marker="o",
                   color=KIND_COLOURS[kind], label=KIND_LABELS[kind])
    lines.axhline(result.chance, color="grey", linestyle="--", linewidth=0.8, label="chance")
    lines.set_xlabel("layer")
    lines.set_ylabel("attribute rate")
    lines.set_ylim(-0.02, 1.02)
    lines.set_title("at the last subject token", fontsize=9)
    lines.legend(fontsize=7)
    fig.suptitle(title or f"logit lens: {result.prompt!r}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_average_lens(avg: AverageLens, *, title: str = "") -> Figure:
    """Mean attribute rate by layer, per kind, at the last subject token and at the last
    token, with the chance rate."""
    fig, axes = _figure(8.0, 3.0, ncols=2)
    layers = np.arange(avg.n_layers)
    for ax, group, label in zip(axes, ("last_subject", "last"),
                                ("at the last subject token", "at the last token"),
                                strict=True):
        for kind in avg.kinds:
            ax.plot(layers, avg.at(kind, group), marker="o", color=KIND_COLOURS[kind],
                    label=KIND_LABELS[kind])
        ax.axhline(avg.chance, color="grey", linestyle="--", linewidth=0.8, label="chance")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers[::max(1, avg.n_layers // 12)])
    axes[0].set_ylabel(f"attribute rate (top {avg.k})")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or f"logit lens, mean over {avg.n_facts} facts", fontsize=10)
    fig.tight_layout()
    return fig
