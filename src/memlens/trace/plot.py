"""Figures of causal traces, as in Meng et al. (2022) Fig. 1 and 2; PNG and SVG.

    paths = plot_trace(result, "out/")        # out/trace_hidden.png, .svg, trace_mlp..., ...
    paths = plot_average(avg, "out/")         # out/avg_hidden.png (groups × layers), avg_lines.png
    fig = plot_trace(result)                  # no directory: one Figure, the kinds side by side

Heatmaps are tokens × layers of P(answer) after restoration (colour floor at p_corrupted),
subject tokens marked with ``*``; hidden states purple, MLP green, attention red (as the paper).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memlens.figures import finish_figure, pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
SHORT_TITLES = {"hidden": "hidden state", "mlp": "MLP outputs", "attn": "attention outputs",
                "severed_mlp": "hidden state, MLPs severed",
                "severed_attn": "hidden state, attention severed"}  # panels side by side


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    return paths


def _save_per_kind(kinds, size: tuple[float, float], draw, out: Path, prefix: str) -> list[Path]:
    """One figure per kind, ``draw(fig, ax, kind)`` on it, saved as ``<prefix>_<kind>``."""
    plt = pyplot()
    paths: list[Path] = []
    for kind in kinds:
        fig, ax = plt.subplots(figsize=size)
        draw(fig, ax, kind)
        paths += _save(fig, out, f"{prefix}_{kind}")
        plt.close(fig)
    return paths


def _trace_labels(result: TraceResult) -> list[str]:
    labels = [repr(t)[1:-1] for t in result.tokens]
    first, end = result.subject_range
    for i in range(first, end):
        labels[i] += "*"
    return labels


def _draw_trace(fig, ax, result: TraceResult, kind: str, model_name: str,
                titles: dict[str, str] = TITLES) -> None:
    """The heatmap of one kind of ``result`` on ``ax``."""
    scores = result.scores[kind]
    n_tokens, n_layers = scores.shape
    image = ax.pcolormesh(np.ma.masked_invalid(scores), cmap=CMAPS.get(kind, "Purples"),
                          vmin=min(result.p_corrupted, np.nanmin(scores)))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(n_tokens) + 0.5, _trace_labels(result), fontsize=8)
    step = max(1, n_layers // 8)
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5, list(range(0, n_layers, step)))
    window = "" if kind == "hidden" or kind.startswith("severed") else \
        f" (centre of {result.window} layers)"
    ax.set_xlabel(f"restored layer{window}" + (f" in {model_name}" if model_name else ""))
    ax.set_title(titles.get(kind, kind), fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({result.answer.strip()!r})", fontsize=8)


def plot_trace(result: TraceResult, out: str | Path | None = None, *,
               model_name: str = "") -> list[Path] | Figure:
    """One heatmap per kind of ``result`` (tokens × layers), saved as PNG and SVG in ``out``
    (the paths are returned). Without ``out``: one Figure with the kinds side by side (as the
    paper's Fig. 1), nothing written — a notebook shows it inline."""
    plt = pyplot()
    n_tokens, n_layers = next(iter(result.scores.values())).shape
    size = (1.2 + 0.35 * n_layers, 0.8 + 0.28 * n_tokens)
    if out is None:
        kinds = list(result.scores)
        fig, axes = plt.subplots(1, len(kinds), squeeze=False, layout="constrained",
                                 figsize=(max(size[0], 3.4) * len(kinds), size[1] + 0.4))
        for ax, kind in zip(axes[0], kinds, strict=True):
            _draw_trace(fig, ax, result, kind, "", SHORT_TITLES)
        fig.suptitle(f"{result.prompt!r} → {result.answer!r}, subject corrupted, one state "
                     "restored" + (f" ({model_name})" if model_name else ""), fontsize=10)
        return finish_figure(fig)
    return _save_per_kind(result.scores, size,
                          lambda fig, ax, kind: _draw_trace(fig, ax, result, kind, model_name),
                          Path(out), "trace")


def _draw_average(fig, ax, avg: AverageTrace, kind: str) -> None:
    """The AIE heatmap (token groups × layers) of one kind on ``ax``."""
    from memlens.trace.average import GROUP_LABELS

    layers = np.arange(avg.n_layers)
    image = ax.pcolormesh(np.ma.masked_invalid(avg.aie[kind]), cmap=CMAPS.get(kind))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(GROUP_LABELS)) + 0.5, GROUP_LABELS, fontsize=8)
    ax.set_xticks(layers + 0.5, list(layers))
    ax.set_xlabel("restored layer")
    ax.set_title(f"AIE, {TITLES.get(kind, kind)} (n={avg.n_facts})", fontsize=9)
    fig.colorbar(image, ax=ax)


def _draw_lines(axes, avg: AverageTrace) -> None:
    """AIE per layer at the last subject token and at the last token, one line per kind."""
    layers = np.arange(avg.n_layers)
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


def plot_average(avg: AverageTrace, out: str | Path | None = None) -> list[Path] | Figure:
    """Per kind, a heatmap of AIE (the six token groups × layers); and line plots of AIE at the
    last subject token and at the last token for every kind. PNG and SVG in ``out`` (the paths
    are returned). Without ``out``: one Figure, the heatmaps above the line plots."""
    plt = pyplot()
    heat = (1.6 + 0.35 * avg.n_layers, 2.4)
    if out is None:
        n = len(avg.kinds)
        fig = plt.figure(figsize=(max(heat[0] * n, 8), heat[1] + 2.8), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[heat[1], 2.8])
        for ax, kind in zip(top.subplots(1, n, squeeze=False)[0], avg.kinds, strict=True):
            _draw_average(top, ax, avg, kind)
        _draw_lines(bottom.subplots(1, 2, sharey=True), avg)
        return finish_figure(fig)
    out = Path(out)
    paths = _save_per_kind(avg.kinds, heat,
                           lambda fig, ax, kind: _draw_average(fig, ax, avg, kind), out, "avg")
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True)
    _draw_lines(axes, avg)
    paths += _save(fig, out, "avg_lines")
    plt.close(fig)
    return paths
