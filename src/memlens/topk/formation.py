"""How TopK neurons form over training: entropy and concepts of the same neurons per snapshot.

    report = formation_report("runs/topk", blocks)      # snapshots of `memlens topk train`
    report.table()                 # per snapshot and layer: mean token / semantic entropy
    report.layers[0].stable_fraction        # share of units whose concept holds over the last half
    plot_entropy_over_training(report, "entropy_over_training.png")
    plot_concept_trajectories(report, "concept_trajectories.png")

Snapshots are the HF directories that :class:`memlens.topk.train.Snapshots` keeps under a run
(``topk/snapshots/step-NNNNNN``, each loaded at the α it was trained with). Every snapshot gets
a :func:`~memlens.topk.neurons.neuron_report` on the same text.

**Matching.** A neuron is unit k of layer l's MLP hidden state; it is matched across snapshots
by that index, as the paper follows the same neuron through training (no permutation matching:
snapshots of one run share their initialisation, so unit k stays unit k).

**Concept and settling.** A neuron's concept at a snapshot is its top token: the token type
with the largest mean |a| per occurrence (``top_tokens[k][0]`` of the neuron report; none if
the unit never fires on the text). A neuron *settles* at the first snapshot from which its
concept stays the same at every later snapshot (never, if its final concept is none).
It is *stable over the last half* if its concept is the same (and not none) at every snapshot
with step ≥ half the final step. Alongside, ``top_overlap`` is the mean Jaccard overlap of
the neuron's top-token set (all above-threshold tokens) with that at the final snapshot.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memlens.errors import MemlensError
from memlens.figures import finish_figure, pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CRITERION = ("concept = the unit's top token (largest mean |a| per occurrence); settled at "
             "the first snapshot after which it never changes; stable = same top token at "
             "every snapshot with step >= final step / 2; units matched by index")


@dataclass
class SnapshotLayer:
    """Mean entropies of one layer at one snapshot."""

    step: int
    alpha: float
    layer: int
    is_topk: bool
    mean_token_entropy: float  # nats, over units that fire
    mean_semantic_entropy: float  # bits
    dead_fraction: float
    changed_fraction: float | None  # share of units whose concept differs from the previous one


@dataclass
class LayerFormation:
    """Every unit of one layer over the snapshots (lists indexed by unit, then snapshot)."""

    layer: int
    is_topk: bool
    concept: list[list[str | None]]  # [unit][snapshot] top token (None: never fires)
    concept_id: list[list[int | None]]
    settled_step: list[int | None]  # [unit] step it settled at (None: final concept is none)
    stable_last_half: list[bool]  # [unit]
    top_overlap: list[float | None]  # [unit] mean Jaccard of top-token sets with the final set
    final_semantic_entropy: list[float | None]
    final_token_entropy: list[float | None]

    @property
    def stable_fraction(self) -> float:
        """Share of all units whose concept holds over the last half of training."""
        return sum(self.stable_last_half) / max(1, len(self.stable_last_half))

    @property
    def stable_fraction_alive(self) -> float:
        """Share of the units that fire at the end whose concept holds over the last half."""
        alive = [s for s, c in zip(self.stable_last_half, self.concept, strict=True)
                 if c[-1] is not None]
        return sum(alive) / len(alive) if alive else math.nan

    @property
    def median_settled_step(self) -> float:
        steps = sorted(s for s in self.settled_step if s is not None)
        if not steps:
            return math.nan
        mid = len(steps) // 2
        return float(steps[mid]) if len(steps) % 2 else (steps[mid - 1] + steps[mid]) / 2

    def summary(self) -> dict:
        settled = [s for s in self.settled_step if s is not None]
        return {"layer": self.layer, "is_topk": self.is_topk, "units": len(self.settled_step),
                "stable_fraction": self.stable_fraction,
                "stable_fraction_alive": self.stable_fraction_alive,
                "settled_fraction": len(settled) / max(1, len(self.settled_step)),
                "median_settled_step": self.median_settled_step,
                "mean_top_overlap": _mean(self.top_overlap)}


@dataclass
class FormationReport:
    """Neuron formation of one TopK run: per-snapshot entropies and per-unit concept histories."""

    run: str
    steps: list[int]
    alphas: list[float]
    criterion: str
    snapshots: list[SnapshotLayer] = field(default_factory=list)
    layers: list[LayerFormation] = field(default_factory=list)

    def layer(self, layer: int) -> LayerFormation:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise MemlensError(f"layer {layer} is not in this report")

    def stable_fraction(self, topk_only: bool = True) -> float:
        """Share of units (of TopK layers, or all) stable over the last half of training."""
        chosen = [e for e in self.layers if e.is_topk or not topk_only] or self.layers
        stable = sum(sum(e.stable_last_half) for e in chosen)
        return stable / max(1, sum(len(e.stable_last_half) for e in chosen))

    def table(self) -> list[dict]:
        """One row per snapshot: step, α, and per layer (token H, semantic H)."""
        rows = []
        for step, alpha in zip(self.steps, self.alphas, strict=True):
            cells = {e.layer: (e.mean_token_entropy, e.mean_semantic_entropy)
                     for e in self.snapshots if e.step == step}
            rows.append({"step": step, "alpha": alpha, "layers": cells})
        return rows

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": [e.summary() for e in self.layers],
                "stable_fraction_topk": self.stable_fraction(True),
                "stable_fraction_all": self.stable_fraction(False)}

    def to_markdown(self) -> str:
        layers = [e.layer for e in self.layers]
        topk = {e.layer for e in self.layers if e.is_topk}
        head = " | ".join(f"L{layer}{' (TopK)' if layer in topk else ''}" for layer in layers)
        lines = ["Mean token entropy (nats) / semantic entropy (bits) of the neurons by layer:",
                 "", f"| step | α | {head} |", "|---|---|" + "---|" * len(layers)]
        for row in self.table():
            cells = " | ".join(f"{row['layers'][layer][0]:.2f} / {row['layers'][layer][1]:.2f}"
                               for layer in layers)
            lines.append(f"| {row['step']} | {row['alpha']:.2f} | {cells} |")
        half = self.steps[-1] / 2
        lines += ["", f"Concepts (criterion: {self.criterion}); last half = steps ≥ {half:g}:", "",
                  "| layer | stable over last half | of units that fire | median settling step "
                  "| mean top-token overlap with final |", "|---|---|---|---|---|"]
        for e in self.layers:
            s = e.summary()
            lines.append(f"| {e.layer}{' (TopK)' if e.is_topk else ''} | "
                         f"{s['stable_fraction']:.3f} | {s['stable_fraction_alive']:.3f} | "
                         f"{s['median_settled_step']:g} | {s['mean_top_overlap']:.3f} |")
        lines += ["", f"Stable over the last half: {self.stable_fraction(True):.3f} of TopK-layer "
                  f"units, {self.stable_fraction(False):.3f} of all units.", ""]
        return "\n".join(lines)


def _mean(values) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def _jaccard(a: list[int], b: list[int]) -> float | None:
    if not a and not b:
        return None
    return len(set(a) & set(b)) / len(set(a) | set(b))


def settled_index(concepts: list) -> int | None:
    """Index of the first snapshot from which ``concepts`` never changes (None: ends in None).

        settled_index(["a", "b", "b"]) == 1; settled_index(["a", None]) is None
    """
    if not concepts or concepts[-1] is None:
        return None
    i = len(concepts) - 1
    while i > 0 and concepts[i - 1] == concepts[-1]:
        i -= 1
    return i


def formation_from_reports(reports: list, steps: list[int], alphas: list[float],
                           run: str = "") -> FormationReport:
    """Build the formation report from per-snapshot :class:`~memlens.topk.neurons.NeuronReport`
    (same layers and units, in step order)."""
    if not reports:
        raise MemlensError("no snapshots to follow")
    if sorted(steps) != list(steps):
        raise MemlensError(f"snapshots must be in step order, got {steps}")
    out = FormationReport(run=run, steps=list(steps), alphas=list(alphas), criterion=CRITERION)
    last_half = [i for i, s in enumerate(steps) if s >= steps[-1] / 2]
    for li, final in enumerate(reports[-1].layers):
        per_snapshot = [r.layers[li] for r in reports]
        units = len(final.top_token_ids)
        ids = [[(e.top_token_ids[u][0] if e.top_token_ids[u] else None) for e in per_snapshot]
               for u in range(units)]
        names = [[(e.top_tokens[u][0] if e.top_tokens[u] else None) for e in per_snapshot]
                 for u in range(units)]
        settled, stable, overlap = [], [], []
        for u in range(units):
            idx = settled_index(ids[u])
            settled.append(None if idx is None else steps[idx])
            tail = [ids[u][i] for i in last_half]
            stable.append(len(tail) > 0 and tail[0] is not None and len(set(tail)) == 1)
            jac = [_jaccard(e.top_token_ids[u], final.top_token_ids[u]) for e in per_snapshot]
            overlap.append(_mean(jac) if any(j is not None for j in jac) else None)
        out.layers.append(LayerFormation(
            layer=final.layer, is_topk=final.is_topk, concept=names, concept_id=ids,
            settled_step=settled, stable_last_half=stable,
            top_overlap=[None if o is None or math.isnan(o) else o for o in overlap],
            final_semantic_entropy=list(final.semantic_entropy),
            final_token_entropy=list(final.token_entropy)))
        for si, (entry, step, alpha) in enumerate(zip(per_snapshot, steps, alphas, strict=True)):
            changed = None if si == 0 else sum(
                ids[u][si] != ids[u][si - 1] for u in range(units)) / max(1, units)
            out.snapshots.append(SnapshotLayer(
                step=step, alpha=alpha, layer=entry.layer, is_topk=final.is_topk,
                mean_token_entropy=entry.mean_token_entropy,
                mean_semantic_entropy=entry.mean_semantic_entropy,
                dead_fraction=entry.dead_fraction, changed_fraction=changed))
    return out


def formation_report(run: str | Path, blocks: torch.Tensor, *, layers: list[int] | None = None,
                     device: str | None = "cpu", progress: bool = False,
                     **neuron_kwargs) -> FormationReport:
    """Neuron reports of every snapshot of ``run`` on ``blocks`` (LongTensor (N, T), tokenized
    with the run's tokenizer), matched by unit index; see the module docstring for the criteria.

        report = formation_report("runs/topk", neuron_blocks(tokenizer, text, 128, 256))
    """
    from memlens.model import load_model
    from memlens.topk.neurons import neuron_report
    from memlens.topk.train import SNAPSHOT_FILE, list_snapshots

    snapshots = list_snapshots(run)
    if not snapshots:
        raise MemlensError(f"{run} holds no snapshots (topk/snapshots/step-*/); train with "
                           "`memlens topk train --keep-steps ...`")
    reports, steps, alphas = [], [], []
    for step, directory in snapshots:
        handle = load_model(str(directory), device=device)
        reports.append(neuron_report(handle, blocks, layers, **neuron_kwargs))
        steps.append(step)
        alphas.append(float(json.loads((directory / SNAPSHOT_FILE).read_text())["alpha"]))
        if progress:
            print(f"snapshot step {step}: measured", flush=True)
        del handle
    return formation_from_reports(reports, steps, alphas, run=str(run))


def plot_entropy_over_training(report: FormationReport,
                               path: str | Path | None = None) -> Path | Figure:
    """Mean token and semantic entropy of each layer's neurons against the training step
    (log axis); TopK layers solid, dense layers dashed.

        plot_entropy_over_training(report, "entropy_over_training.png")
    """
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for entry in report.layers:
        rows = [s for s in report.snapshots if s.layer == entry.layer]
        style = "-" if entry.is_topk else "--"
        label = f"layer {entry.layer}{' (TopK)' if entry.is_topk else ''}"
        axes[0].plot([s.step for s in rows], [s.mean_token_entropy for s in rows], style,
                     marker="o", label=label)
        axes[1].plot([s.step for s in rows], [s.mean_semantic_entropy for s in rows], style,
                     marker="o", label=label)
    end = [s for s, a in zip(report.steps, report.alphas, strict=True) if a == 0.0]
    for ax in axes:
        ax.set_xscale("log")
        if end:
            ax.axvline(end[0], color="0.6", lw=0.8, ls=":")
    axes[0].set(title="token entropy (nats)", xlabel="training step", ylabel="mean over neurons")
    axes[1].set(title="semantic entropy (bits)", xlabel="training step")
    axes[1].legend(fontsize=7)
    fig.suptitle("neuron entropy by layer over training (dotted: first snapshot with α = 0)")
    fig.tight_layout()
    return finish_figure(fig, path)


def pick_trajectories(report: FormationReport, n: int = 8) -> list[tuple[int, int]]:
    """(layer, unit) of ``n`` neurons worth showing: from TopK layers (all if none) in turn,
    the units that fire at the end with the lowest final semantic then token entropy, half of
    them stable over the last half and half not (if there are such)."""
    layers = [e for e in report.layers if e.is_topk] or report.layers
    pools: list[list[tuple[int, int]]] = []
    for want_stable in (True, False):
        for e in layers:
            units = [u for u in range(len(e.concept)) if e.concept[u][-1] is not None
                     and e.stable_last_half[u] == want_stable]
            units.sort(key=lambda u: (e.final_semantic_entropy[u] or 0.0,
                                      e.final_token_entropy[u] or 0.0))
            pools.append([(e.layer, u) for u in units])
    picks: list[tuple[int, int]] = []
    half = [pools[: len(layers)], pools[len(layers):]]
    for group, quota in ((half[0], (n + 1) // 2), (half[1], n // 2)):
        taken, depth = 0, 0
        while taken < quota and any(depth < len(p) for p in group):
            for pool in group:
                if depth < len(pool) and taken < quota:
                    picks.append(pool[depth])
                    taken += 1
            depth += 1
    return picks


def plot_concept_trajectories(report: FormationReport, path: str | Path | None = None,
                              neurons: list[tuple[int, int]] | None = None) -> Path | Figure:
    """One row per neuron, one column per snapshot: the neuron's top token, green where it
    equals the final one, grey where it differs, white where the unit does not fire.

        plot_concept_trajectories(report, "concepts.png", neurons=[(0, 17), (1, 3)])
    """
    neurons = neurons if neurons is not None else pick_trajectories(report)
    if not neurons:
        raise MemlensError("no neurons to plot (none fires at the final snapshot)")
    n_steps = len(report.steps)
    fig, ax = pyplot().subplots(figsize=(1.1 * n_steps + 2.2, 0.45 * len(neurons) + 1.2))
    colors = torch.zeros(len(neurons), n_steps, 3)
    for row, (layer, unit) in enumerate(neurons):
        history = report.layer(layer).concept[unit]
        for col, token in enumerate(history):
            colors[row, col] = torch.tensor(
                (1.0, 1.0, 1.0) if token is None else
                (0.70, 0.88, 0.70) if token == history[-1] else (0.85, 0.85, 0.85))
            text = "·" if token is None else repr(token)[1:-1][:10]
            ax.text(col, row, text, ha="center", va="center", fontsize=7)
    ax.imshow(colors.numpy(), aspect="auto")
    ax.set_xticks(range(n_steps), [str(s) for s in report.steps], fontsize=7)
    ax.set_yticks(range(len(neurons)), [f"{layer}:{unit}" for layer, unit in neurons],
                  fontsize=7)
    ax.set(xlabel="training step (snapshot)", ylabel="neuron (layer:unit)",
           title="top token of each neuron over training (green: = final concept)")
    fig.tight_layout()
    return finish_figure(fig, path)


def run_formation(run: str | Path, corpus: str, out: str | Path, *, max_blocks: int = 256,
                  n_trajectories: int = 8, embedder: str | None = None,
                  progress: bool = False) -> FormationReport:
    """The formation study of one run: reads ``corpus`` (text file, organism:NAME or directory
    with corpus.txt) with the last snapshot's tokenizer, measures every snapshot and writes
    ``formation.json``, ``formation.md``, ``entropy_over_training.png`` and
    ``concept_trajectories.png`` into ``out``.

        run_formation("runs/topk", "organism:facts-gpt2", "runs/topk/formation")
    """
    from transformers import AutoTokenizer

    from memlens.topk.data import neuron_blocks, read_corpus_text
    from memlens.topk.train import list_snapshots

    snapshots = list_snapshots(run)
    if not snapshots:
        raise MemlensError(f"{run} holds no snapshots (topk/snapshots/step-*/)")
    tokenizer = AutoTokenizer.from_pretrained(snapshots[-1][1])
    config = json.loads((snapshots[-1][1] / "config.json").read_text())
    context = config.get("n_positions") or config.get("max_position_embeddings") or 128
    blocks = neuron_blocks(tokenizer, read_corpus_text(corpus), min(128, context), max_blocks)
    report = formation_report(run, blocks, embedder=embedder, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "formation.json").write_text(json.dumps(report.to_dict()))
    (out / "formation.md").write_text(report.to_markdown())
    plot_entropy_over_training(report, out / "entropy_over_training.png")
    neurons = pick_trajectories(report, n_trajectories)
    if neurons:
        plot_concept_trajectories(report, out / "concept_trajectories.png", neurons)
    return report
