"""P-probing (Allen-Zhu & Li 2023, *Physics of Language Models 3.1*): where a model stores facts.

    from memlens.probe import probe_facts, plot_probe
    from memlens.trace import load_facts
    result = probe_facts(handle, load_facts("known_facts.json"), seed=0)
    result.accuracy[result.groups.index("last_subject")]   # held-out accuracy per layer
    result.best()             # {"group", "layer", "accuracy", "control", "chance"}
    fig = plot_probe(result)  # accuracy vs layer, one line per token group

For every token group and layer a linear classifier reads the residual stream and predicts the
fact's object (its ``attribute``), one classifier per relation (classes = that relation's
objects). It is trained on some subjects and scored on **held-out subjects**, so a high accuracy
means the attribute is linearly decodable from a subject the probe never saw — i.e. the model has
written it into that position, rather than the probe memorising subjects.

- **States.** The prompt is the fact's prompt with its subject (as causal tracing runs it). Layer
  ``-1`` (shown ``emb``) is the residual stream after the embeddings (token + position, the input
  of block 0); layer ``l ≥ 0`` is the output of block ``l`` (before the final norm). Token groups
  (:data:`GROUPS`): the first and last subject token, the first token after the subject (absent
  when the subject ends the prompt; such facts are left out of that group only) and the last
  token — positions as in :func:`memlens.trace.average.token_groups`. Prompts are right-padded
  (:func:`memlens.tokens.encode`), so token positions are the same in the batch as alone.
- **Split.** Per relation, objects held by fewer than 2 subjects are dropped (a held-out subject
  could not have a class seen in training); a relation left with fewer than 2 objects is skipped
  and reported. Each object's subjects are shuffled (seeded) and ``n·f`` of them, randomly
  rounded and at most ``n − 1``, go to the test side, so every test object was seen in training
  and the test share is ``f`` in expectation. All facts of one subject fall on the same side.
- **Classifier.** Multinomial logistic regression with an L2 penalty, in float32: features
  standardised with the training rows' mean and std, loss = mean cross-entropy + ``l2``/2 · ‖W‖²
  (bias not penalised), minimised by full-batch L-BFGS (strong-Wolfe line search) from zero
  until every gradient entry is below 1e-5 (float64 to 1e-9 predicts the same classes, at
  2–10× the cost).
  The problem is strictly convex, so the fit is unique and deterministic; all (group, layer)
  problems of a relation are solved in one batched L-BFGS run (they are independent, so the
  sum's minimiser is every problem's minimiser).
- **Controls.** *chance* = accuracy of always answering the relation's most frequent training
  object; *control* = the same probe trained on the training labels shuffled among the training
  subjects (seeded), scored on the true test labels — what a probe reaches without the states
  carrying the attribute. Pooled numbers are over all relations, weighted by test facts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlens.errors import EmptyInput, MemlensError, SubjectNotFound
from memlens.hooks import capture
from memlens.tokens import subject_span
from memlens.trace.average import select_facts, token_groups

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from memlens.model import ModelHandle

#: Token groups probed, in order (names as in :data:`memlens.trace.GROUPS`).
GROUPS = ("first_subject", "last_subject", "first_subsequent", "last")
GROUP_LABELS = ("first subject token", "last subject token", "first subsequent token",
                "last token")
#: Layer index of the residual stream after the embeddings (the input of block 0).
EMBEDDINGS = -1


def layer_label(layer: int) -> str:
    """``"emb"`` for :data:`EMBEDDINGS`, else the block index as text."""
    return "emb" if layer == EMBEDDINGS else str(layer)


@dataclass
class RelationProbe:
    """Probe results of one relation: arrays are groups × layers (NaN: no test fact there)."""

    relation: str
    classes: list[str]  # the objects the probe chooses among
    n_train_subjects: int
    n_test_subjects: int
    n_test: list[int]  # test facts per group
    accuracy: np.ndarray  # (groups, layers) held-out accuracy
    control: np.ndarray  # (groups, layers) held-out accuracy of the shuffled-label probe
    chance: list[float]  # per group: accuracy of the majority training object on the test facts

    def to_json(self) -> dict[str, Any]:
        return {"relation": self.relation, "classes": self.classes,
                "n_train_subjects": self.n_train_subjects,
                "n_test_subjects": self.n_test_subjects, "n_test": self.n_test,
                "accuracy": _nan_to_none(self.accuracy), "control": _nan_to_none(self.control),
                "chance": _nan_to_none(self.chance)}


@dataclass
class ProbeResult:
    """P-probe accuracies pooled over relations (groups × layers), per relation, and controls."""

    groups: list[str]
    layers: list[int]  # block indices; EMBEDDINGS (-1) = after the embeddings
    accuracy: np.ndarray  # (groups, layers) pooled held-out accuracy
    control: np.ndarray  # (groups, layers) pooled shuffled-label control
    chance: list[float]  # per group: pooled majority-class accuracy
    n_test: list[int]  # per group: test facts pooled over relations
    relations: list[RelationProbe]
    skipped: list[dict[str, str]] = field(default_factory=list)  # relation, reason
    n_facts: int = 0  # facts given (after --n), before dropping rare objects
    seed: int = 0
    test_fraction: float = 0.3
    l2: float = 1e-2

    def curve(self, group: str, kind: str = "accuracy") -> np.ndarray:
        """Pooled ``accuracy`` or ``control`` per layer at token ``group``."""
        return getattr(self, kind)[self.groups.index(group)]

    def best(self) -> dict[str, Any]:
        """The (group, layer) of highest pooled held-out accuracy, with its control and chance."""
        acc = np.where(np.isnan(self.accuracy), -np.inf, self.accuracy)
        g, i = np.unravel_index(int(np.argmax(acc)), acc.shape)
        return {"group": self.groups[g], "layer": self.layers[i],
                "accuracy": float(self.accuracy[g, i]), "control": float(self.control[g, i]),
                "chance": self.chance[g]}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``probe.json``)."""
        return {
            "groups": self.groups, "layers": self.layers,
            "layer_labels": [layer_label(layer) for layer in self.layers],
            "accuracy": _nan_to_none(self.accuracy), "control": _nan_to_none(self.control),
            "chance": _nan_to_none(self.chance), "n_test": self.n_test, "best": self.best(),
            "relations": [r.to_json() for r in self.relations], "skipped": self.skipped,
            "n_facts": self.n_facts, "seed": self.seed, "test_fraction": self.test_fraction,
            "l2": self.l2,
        }


def _nan_to_none(values: np.ndarray | Sequence[float]) -> list:
    """Nested lists of floats with NaN (no test fact) as None, so that the JSON is strict."""
    if np.ndim(values) > 1:
        return [_nan_to_none(row) for row in values]
    return [None if np.isnan(v) else float(v) for v in values]


def probe_positions(tokenizer, prompt: str, subject: str) -> dict[str, int | None]:
    """Token position of each probed group in ``prompt`` (None: the group is absent).

        probe_positions(tok, "Miles Davis plays", "Davis")
        # {"first_subject": 3, "last_subject": 5, "first_subsequent": 6, "last": 8}
    """
    span = subject_span(tokenizer, prompt, subject)
    n_tokens = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    groups = token_groups(n_tokens, span.as_list())
    return {g: (groups[g][0] if groups[g] else None) for g in GROUPS}


@torch.no_grad()
def group_states(handle: ModelHandle, prompts: Sequence[str], positions: np.ndarray,
                 layers: Sequence[int], *, batch_size: int = 32) -> torch.Tensor:
    """Residual-stream states (facts, groups, layers, d_model), float32 on the CPU.

    ``positions`` is (facts, groups) of token indices, −1 where a group is absent (its row
    is then zero). Layer :data:`EMBEDDINGS` is the input of block 0, layer l the output of
    block l.
    """
    points = ["blocks.0.hook_resid_pre" if layer == EMBEDDINGS else f"blocks.{layer}.hook_resid_post"
              for layer in layers]
    states = torch.zeros(len(prompts), len(GROUPS), len(layers), handle.d_model)
    for start in range(0, len(prompts), batch_size):
        batch = handle.encode(list(prompts[start:start + batch_size]))
        pos = torch.as_tensor(positions[start:start + batch_size], dtype=torch.long)
        rows = torch.arange(len(pos))
        with capture(handle.model, points) as cache:
            handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False)
        for i, point in enumerate(points):
            hidden = cache[point].float().cpu()  # (B, T, d)
            picked = hidden[rows[:, None], pos.clamp(min=0)]  # (B, groups, d)
            states[start:start + len(pos), :, i] = picked * (pos >= 0)[..., None]
    return states


def split_subjects(subject_objects: dict[str, str], test_fraction: float,
                   rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """(train subjects, test subjects, dropped objects) of one relation (see module docstring).

    ``subject_objects`` maps each subject to its object. Objects of fewer than 2 subjects are
    dropped; of an object's n subjects, ⌊n·f + u⌋ (u uniform, at most n − 1) are held out, and
    at least one subject overall when any object has two.
    """
    by_object: dict[str, list[str]] = defaultdict(list)
    for subject in sorted(subject_objects):
        by_object[subject_objects[subject]].append(subject)
    dropped = sorted(o for o, subjects in by_object.items() if len(subjects) < 2)
    train: list[str] = []
    test: list[str] = []
    kept = [o for o in sorted(by_object) if o not in dropped]
    for obj in kept:
        subjects = [by_object[obj][i] for i in rng.permutation(len(by_object[obj]))]
        n_test = min(len(subjects) - 1, int(len(subjects) * test_fraction + rng.random()))
        test += subjects[:n_test]
        train += subjects[n_test:]
    if kept and not test:
        largest = max(kept, key=lambda o: (len(by_object[o]), o))
        moved = next(s for s in train if subject_objects[s] == largest)
        train.remove(moved)
        test.append(moved)
    return train, test, dropped


def fit_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                n_classes: int, *, l2: float = 1e-2, max_iter: int = 300) -> torch.Tensor:
    """Fit P independent L2 multinomial logistic regressions; predict their test classes.

    ``x_train`` is (P, n, d), ``y_train`` (P, n) class indices, ``x_test`` (P, m, d); returns
    (P, m) predicted classes. Features are standardised per problem with the training rows'
    statistics; the loss (mean cross-entropy + l2/2 · ‖W‖² per problem, summed over problems)
    is minimised in float32 by full-batch L-BFGS from zero.
    """
    x_train, x_test = x_train.float(), x_test.float()
    mean = x_train.mean(dim=1, keepdim=True)
    std = x_train.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    P, _, d = x_train.shape
    W = torch.zeros(P, d, n_classes, requires_grad=True)
    b = torch.zeros(P, 1, n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-5,
                                  tolerance_change=1e-9, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x_train @ W + b  # (P, n, C)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y_train,
                                                reduction="none").mean(dim=1)  # (P,)
        loss = (nll + 0.5 * l2 * W.pow(2).sum(dim=(1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (x_test @ W + b).argmax(dim=-1)


def probe_facts(handle: ModelHandle, facts: Sequence[dict[str, str]], *,
                layers: Sequence[int] | None = None, n: int | None = None, seed: int = 0,
                test_fraction: float = 0.3, l2: float = 1e-2, batch_size: int = 32,
                progress: bool = False) -> ProbeResult:
    """P-probe ``facts`` ({prompt, subject, attribute, relation?}) at every group and layer.

    ``layers``: block indices and/or :data:`EMBEDDINGS` (default: the embeddings and every
    block); ``n``: keep at most n facts, spread evenly over the list (every relation keeps its
    share). Facts without a ``relation`` field form one relation, ``"all"``.

        result = probe_facts(handle, load_facts("known_facts.json"), layers=[-1, 0, 1])
        result.best()["accuracy"], result.chance, result.skipped
    """
    if not 0 < test_fraction < 1:
        raise MemlensError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    layers = _check_layers(handle, layers)
    facts = select_facts(facts, n)
    if not facts:
        raise EmptyInput("no facts to probe")
    prompts, positions = [], []
    for i, fact in enumerate(facts):
        prompt, subject = fact.get("prompt") or "", fact.get("subject") or ""
        if not fact.get("attribute"):
            raise MemlensError(f"fact {i} ({subject!r}) has no attribute (object) to probe for")
        prompt = prompt.format(subject) if "{}" in prompt else prompt
        try:
            found = probe_positions(handle.tokenizer, prompt, subject)
        except (SubjectNotFound, EmptyInput) as exc:
            raise type(exc)(f"fact {i}: {exc}") from None
        prompts.append(prompt)
        positions.append([-1 if found[g] is None else found[g] for g in GROUPS])
    by_relation: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        by_relation[fact.get("relation") or "all"].append(i)

    rng = np.random.default_rng(seed)
    plans, skipped = [], []
    for relation in sorted(by_relation):
        plan = _plan(relation, [facts[i] for i in by_relation[relation]], by_relation[relation],
                     test_fraction, rng)
        if isinstance(plan, str):
            skipped.append({"relation": relation, "reason": plan})
        else:
            plans.append(plan)
    if not plans:
        reasons = "; ".join(f"{s['relation']}: {s['reason']}" for s in skipped)
        raise EmptyInput(f"too few facts or classes to probe ({len(facts)} facts): {reasons}")

    needed = sorted({i for plan in plans for i in plan.train + plan.test})
    states = torch.zeros(len(facts), len(GROUPS), len(layers), handle.d_model)
    states[needed] = group_states(handle, [prompts[i] for i in needed],
                                  np.asarray(positions)[needed], layers, batch_size=batch_size)
    present = torch.as_tensor(np.asarray(positions) >= 0)  # (facts, groups)
    from rich.progress import track

    relations = [_fit_relation(plan, states, present, l2, rng)
                 for plan in track(plans, description="probing relations", disable=not progress)]
    return _pool(relations, layers, skipped, len(facts), seed, test_fraction, l2)


@dataclass
class _Plan:
    """One relation's classes and its train/test facts (indices into the fact list)."""

    relation: str
    classes: list[str]
    labels: dict[int, int]  # fact index → class index
    train: list[int]
    test: list[int]
    n_train_subjects: int
    n_test_subjects: int


def _plan(relation: str, facts: list[dict[str, str]], indices: list[int],
          test_fraction: float, rng: np.random.Generator) -> _Plan | str:
    """Split one relation's subjects; a string says why the relation cannot be probed."""
    objects: dict[str, Counter] = defaultdict(Counter)
    for fact in facts:
        objects[fact["subject"]][fact["attribute"]] += 1
    subject_objects = {s: c.most_common(1)[0][0] for s, c in objects.items()}
    train, test, dropped = split_subjects(subject_objects, test_fraction, rng)
    classes = sorted({subject_objects[s] for s in train})
    if len(classes) < 2:
        return (f"{len(subject_objects)} subjects, {len(set(subject_objects.values()))} objects, "
                f"{len(classes)} with ≥ 2 subjects (need ≥ 2 such objects)")
    index = {c: k for k, c in enumerate(classes)}
    sides = {**dict.fromkeys(train, "train"), **dict.fromkeys(test, "test")}
    plan = _Plan(relation, classes, {}, [], [], len(train), len(test))
    for i, fact in zip(indices, facts, strict=True):
        side = sides.get(fact["subject"])
        if side is None or fact["attribute"] not in index:
            continue
        plan.labels[i] = index[fact["attribute"]]
        (plan.train if side == "train" else plan.test).append(i)
    return plan


def _fit_relation(plan: _Plan, states: torch.Tensor, present: torch.Tensor, l2: float,
                  rng: np.random.Generator) -> RelationProbe:
    """Fit the true-label and shuffled-label probes of every (group, layer) of one relation."""
    G, L = len(GROUPS), states.shape[2]
    accuracy, control = np.full((G, L), np.nan), np.full((G, L), np.nan)
    chance, n_test = [float("nan")] * G, [0] * G
    train, test = torch.tensor(plan.train), torch.tensor(plan.test)
    y_train = torch.tensor([plan.labels[i] for i in plan.train])
    y_test = torch.tensor([plan.labels[i] for i in plan.test])
    shuffled = y_train[torch.as_tensor(rng.permutation(len(y_train)))]
    majority = int(torch.bincount(y_train).argmax())
    for g in range(G):
        tr, te = present[train, g], present[test, g]
        if not te.any() or len(set(y_train[tr].tolist())) < 2:
            continue
        x_train = states[train[tr], g].transpose(0, 1)  # (layers, n, d)
        x_test = states[test[te], g].transpose(0, 1)
        labels = torch.stack([y_train[tr], shuffled[tr]]).repeat_interleave(L, dim=0)
        predicted = fit_predict(torch.cat([x_train, x_train]), labels,
                                torch.cat([x_test, x_test]), len(plan.classes), l2=l2)
        hits = (predicted == y_test[te]).double().mean(dim=1).numpy()  # (2 L,)
        accuracy[g], control[g] = hits[:L], hits[L:]
        chance[g] = float((y_test[te] == majority).double().mean())
        n_test[g] = int(te.sum())
    return RelationProbe(plan.relation, plan.classes, plan.n_train_subjects,
                         plan.n_test_subjects, n_test, accuracy, control, chance)


def _pool(relations: list[RelationProbe], layers: list[int], skipped: list[dict[str, str]],
          n_facts: int, seed: int, test_fraction: float, l2: float) -> ProbeResult:
    """Pool per-relation accuracies over relations, weighted by their test facts per group."""
    weights = np.array([r.n_test for r in relations], dtype=float)  # (relations, groups)
    totals = weights.sum(axis=0)

    def pooled(values: np.ndarray) -> np.ndarray:  # (relations, groups[, layers])
        extra = (1,) * (values.ndim - 2)
        total = (np.nan_to_num(values) * weights.reshape(weights.shape + extra)).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / totals.reshape(totals.shape + extra)

    accuracy = pooled(np.stack([r.accuracy for r in relations]))
    control = pooled(np.stack([r.control for r in relations]))
    chance = pooled(np.array([r.chance for r in relations]))
    return ProbeResult(list(GROUPS), list(layers), accuracy, control,
                       [float(c) for c in chance], [int(t) for t in totals], relations, skipped,
                       n_facts, seed, test_fraction, l2)


def parse_probe_layers(spec: str) -> list[int]:
    """``--layers`` of ``memlens probe``: :func:`memlens.stats.parse_layers` syntax plus
    ``emb`` for :data:`EMBEDDINGS` — ``"emb,0-3"`` → [-1, 0, 1, 2, 3]."""
    from memlens.stats import parse_layers

    parts = [p.strip() for p in spec.split(",")]
    rest = ",".join(p for p in parts if p != "emb")
    return ([EMBEDDINGS] if "emb" in parts else []) + (parse_layers(rest) if rest else [])


def _check_layers(handle: ModelHandle, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return [EMBEDDINGS, *range(handle.n_layers)]
    chosen = sorted(set(layers))
    bad = [layer for layer in chosen if not EMBEDDINGS <= layer < handle.n_layers]
    if bad or not chosen:
        raise MemlensError(f"layers {bad or '[]'} do not exist: the model has blocks 0 … "
                           f"{handle.n_layers - 1} (and {EMBEDDINGS} = after the embeddings)")
    return chosen


def plot_probe(result: ProbeResult, *, title: str = "") -> Figure:
    """Held-out probe accuracy vs layer, one line per token group; the shuffled-label control
    dashed in the group's colour and the pooled chance level as a grey dotted line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    x = np.arange(len(result.layers))
    colours = ("tab:blue", "tab:purple", "tab:green", "tab:red")
    for g, (label, colour) in enumerate(zip(GROUP_LABELS, colours, strict=True)):
        if np.all(np.isnan(result.accuracy[g])):
            continue
        ax.plot(x, result.accuracy[g], marker="o", color=colour, label=label)
        ax.plot(x, result.control[g], linestyle="--", color=colour, alpha=0.6)
    last = result.groups.index("last")
    ax.axhline(result.chance[last], color="grey", linestyle=":", label="chance (majority)")
    ax.plot([], [], linestyle="--", color="black", alpha=0.6, label="shuffled-label control")
    ax.set_xticks(x, [layer_label(layer) for layer in result.layers])
    ax.set_xlabel("layer (emb = after the embeddings)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"P-probe: attribute from hidden states ({result.n_test[last]} "
                 "held-out facts)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
