"""Figures of causal traces, as in Meng et al. (2022) Fig. 1 and 2; PNG and SVG.

    paths = plot_trace(result, "out/")        # out/trace_hidden.png, .svg, trace_mlp..., ...
    paths = plot_average(avg, "out/")         # out/avg_hidden.png (groups × layers), avg_lines.png

Heatmaps are tokens × layers of P(answer) after restoration (colour floor at p_corrupted),
subject tokens marked with ``*``; hidden states purple, MLP green, attention red (as the paper).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memlens.figures import pyplot

if TYPE_CHECKING:
    from memlens.trace.average import AverageTrace
    from memlens.trace.runs import TraceResult

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "severed_mlp": "Purples",
         "severed_attn": "Purples"}
LINE_COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red",
                "severed_mlp": "tab:olive", "severed_attn": "tab:orange"}
TITLES = {"hidden": "restoring the hidden state", "mlp": "restoring MLP outputs",
          "attn": "restoring attention outputs",
          "severed_mlp": "restoring the hidden state, MLPs at the token frozen",
          "severed_attn": "restoring the hidden state, attention at the token frozen"}


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    return paths


def plot_trace(result: TraceResult, out: str | Path, *, model_name: str = "") -> list[Path]:
    """One heatmap per kind of ``result`` (tokens × layers), saved as PNG and SVG in ``out``."""
    plt = pyplot()
    out = Path(out)
    labels = [repr(t)[1:-1] for t in result.tokens]
    first, end = result.subject_range
    for i in range(first, end):
        labels[i] += "*"
    paths: list[Path] = []
    for kind, scores in result.scores.items():
        n_tokens, n_layers = scores.shape
        fig, ax = plt.subplots(figsize=(1.2 + 0.35 * n_layers, 0.8 + 0.28 * n_tokens))
        image = ax.pcolormesh(np.ma.masked_invalid(scores), cmap=CMAPS.get(kind, "Purples"),
                              vmin=min(result.p_corrupted, np.nanmin(scores)))
        ax.invert_yaxis()
        ax.set_yticks(np.arange(n_tokens) + 0.5, labels, fontsize=8)
        step = max(1, n_layers // 8)
        ax.set_xticks(np.arange(0, n_layers, step) + 0.5, list(range(0, n_layers, step)))
        window = "" if kind == "hidden" or kind.startswith("severed") else \
            f" (centre of {result.window} layers)"
        ax.set_xlabel(f"restored layer{window}" + (f" in {model_name}" if model_name else ""))
        ax.set_title(TITLES.get(kind, kind), fontsize=9)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(f"p({result.answer.strip()!r})", fontsize=8)
        paths += _save(fig, out, f"trace_{kind}")
        plt.close(fig)
    return paths


def plot_average(avg: AverageTrace, out: str | Path) -> list[Path]:
    """Per kind, a heatmap of AIE (the six token groups × layers); and line plots of AIE at the
    last subject token and at the last token for every kind. PNG and SVG in ``out``."""
    from memlens.trace.average import GROUP_LABELS

    plt = pyplot()
    out = Path(out)
    paths: list[Path] = []
    layers = np.arange(avg.n_layers)
    for kind in avg.kinds:
        fig, ax = plt.subplots(figsize=(1.6 + 0.35 * avg.n_layers, 2.4))
        image = ax.pcolormesh(np.ma.masked_invalid(avg.aie[kind]), cmap=CMAPS.get(kind))
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(GROUP_LABELS)) + 0.5, GROUP_LABELS, fontsize=8)
        ax.set_xticks(layers + 0.5, list(layers))
        ax.set_xlabel("restored layer")
        ax.set_title(f"AIE, {TITLES.get(kind, kind)} (n={avg.n_facts})", fontsize=9)
        fig.colorbar(image, ax=ax)
        paths += _save(fig, out, f"avg_{kind}")
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True)
    for ax, group, label in zip(axes, ("last_subject", "last"),
                                ("at the last subject token", "at the last token"),
                                strict=True):
        for kind in avg.kinds:
            ax.plot(layers, avg.effect(kind, group), marker="o", label=kind,
                    color=LINE_COLOURS.get(kind))
        ax.axhline(avg.ate, color="grey", linestyle="--", linewidth=0.8, label="ATE")
        ax.set_title(f"average indirect effect {label}", fontsize=9)
        ax.set_xlabel("layer")
    axes[0].set_ylabel("AIE")
    axes[1].legend(fontsize=8)
    paths += _save(fig, out, "avg_lines")
    plt.close(fig)
    return paths
