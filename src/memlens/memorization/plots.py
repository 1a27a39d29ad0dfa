"""Figures of the memorization pipeline (matplotlib, Agg backend), one function per result.

    plot_scan(scan_result, out / "scan.png")
    plot_perturb(perturb_result, out / "perturb.png")
    plot_attribution(attribution_result, out / "attribution.png")
    plot_heads(heads_result, out / "heads.png"); plot_kq(scores, tokens, out / "kq.png")
    plot_updates(update_results, out / "unlearn.png")
    fig = plot_scan(scan_result)                      # no path: the Figure (inline in Jupyter)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from memlens.figures import finish_figure, pyplot

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from memlens.memorization.attribute import AttributionResult
    from memlens.memorization.heads import HeadsResult
    from memlens.memorization.perturb import PerturbResult
    from memlens.memorization.scan import ScanResult
    from memlens.memorization.sparse import UpdateResult


def _save(fig, path: str | Path | None) -> Path | Figure:
    fig.tight_layout()
    return finish_figure(fig, path)


def plot_scan(result: ScanResult, path: str | Path | None = None) -> Path | Figure:
    """Histogram of exact-match lengths, one colour per training-repeat group; NLL vs EM."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict = {}
    for row in result.rows:
        groups.setdefault(row.repeats, []).append(row)
    bins = list(range(result.suffix_len + 2))
    keys = sorted(groups, key=lambda r: (r is None, r or 0))
    ax1.hist([[r.em for r in groups[k]] for k in keys], bins=bins, stacked=True,
             label=[f"×{k}" if k is not None else "all" for k in keys])
    ax1.axvline(result.nmp_max_em + 0.5, color="k", ls="--", lw=0.8)
    ax1.axvline(result.mp_min_em - 0.5, color="r", ls="--", lw=0.8)
    ax1.set(xlabel=f"exact match (tokens of {result.suffix_len})", ylabel="paragraphs",
            title="greedy exact match: NMP ≤ left line, MP ≥ right line")
    ax1.legend(title="repeats")
    for k in keys:
        ax2.scatter([r.em for r in groups[k]], [r.nll for r in groups[k]], s=12,
                    label=f"×{k}" if k is not None else "all")
    ax2.set(xlabel="exact match", ylabel="suffix NLL", title="NLL of the true suffix")
    return _save(fig, path)


def plot_perturb(result: PerturbResult, path: str | Path | None = None) -> Path | Figure:
    """Heatmap of EM drop (paragraphs × prefix positions) and its mean per position."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), height_ratios=[3, 1], sharex=True)
    drop = result.em_drop.float().numpy()
    im = ax1.imshow(drop, aspect="auto", cmap="Reds", interpolation="nearest",
                    extent=(result.positions[0] - 0.5, result.positions[-1] + 0.5,
                            len(result.ids) - 0.5, -0.5))
    fig.colorbar(im, ax=ax1, label="EM drop")
    ax1.set(ylabel="paragraph", title=f"EM drop after one token swap ({result.mode})")
    ax2.plot(result.positions, drop.mean(0), marker=".")
    ax2.set(xlabel="perturbed prefix position", ylabel="mean EM drop")
    return _save(fig, path)


def _heatmap(ax, fig, values, columns, title, cmap="viridis"):
    im = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=6)
    ax.set(ylabel="layer", title=title)


def plot_attribution(result: AttributionResult, path: str | Path | None = None) -> Path | Figure:
    """Heatmaps layers × (heads of W_Q/K/V/O, W_in, W_out): MP, NMP, MP − NMP, contrastive."""
    plt = pyplot()
    panels = [(result.mp.values, "|∂NLL/∂θ| memorized (MP)", "viridis"),
              (result.nmp.values, "|∂NLL/∂θ| non-memorized (NMP)", "viridis"),
              (result.mp.values - result.nmp.values, "MP − NMP", "RdBu_r")]
    if result.contrastive is not None:
        panels.append((result.contrastive.values, "|∂CO/∂θ| contrastive objective", "viridis"))
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(12, 2.6 * (len(panels) + 1)))
    for ax, (values, title, cmap) in zip(axes, panels, strict=False):
        _heatmap(ax, fig, values.numpy(), result.columns, title, cmap)
    layers = range(len(result.mp.layer_sum))
    ax = axes[-1]
    for att in (result.mp, result.nmp, result.contrastive):
        if att is not None:
            ax.plot(layers, (att.layer_sum / att.layer_sum.sum()).numpy(), marker="o",
                    label=att.objective)
    ax.set(xlabel="layer", ylabel="share of Σ|grad|", title="gradient mass per layer")
    ax.legend()
    return _save(fig, path)


def plot_heads(result: HeadsResult, path: str | Path | None = None) -> Path | Figure:
    """Heatmaps layer × head of Kendall τ(attention, frequency) and rare-token attention mass."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lim = float(result.tau.abs().max()) or 1.0
    im = ax1.imshow(result.tau.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=ax1)
    ax1.set(xlabel="head", ylabel="layer", title="Kendall τ(attention, corpus frequency)")
    im = ax2.imshow(result.rare_mass.numpy(), cmap="viridis")
    fig.colorbar(im, ax=ax2)
    ax2.set(xlabel="head", ylabel="layer",
            title=f"attention mass on the {result.rare_ranks} rarest ranks")
    layer, head = result.candidate
    n_layers, n_heads = result.tau.shape
    for ax in (ax1, ax2):
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="k", lw=2))
    return _save(fig, path)


def plot_kq(scores: torch.Tensor, tokens: list[str], path: str | Path | None = None,
            title: str = "") -> Path | Figure:
    """Heatmap of one head's causal KQ scores over one paragraph (query rows × key columns)."""
    plt = pyplot()
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(10, 9))
    values = scores.clone()
    values[values.isinf()] = float("nan")
    im = ax.imshow(values.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    step = max(1, n // 50)
    ax.set_xticks(range(0, n, step), tokens[::step], rotation=90, fontsize=5)
    ax.set_yticks(range(0, n, step), tokens[::step], fontsize=5)
    ax.set(xlabel="key", ylabel="query", title=title or "KQ scores")
    return _save(fig, path)


def plot_updates(results: list[UpdateResult], path: str | Path | None = None) -> Path | Figure:
    """Bars of MP / NMP exact match before and after each update method."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.method for r in results]
    x = range(len(results))
    for ax, key, title in ((ax1, "mp_em", "memorized (MP)"), (ax2, "nmp_em", "non-memorized")):
        ax.bar([i - 0.2 for i in x], [r.before[key] for r in results], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], [r.after[key] for r in results], 0.4, label="after")
        ax.set_xticks(list(x), names)
        ax.set(ylabel="mean exact match", title=title)
        ax.legend()
    return _save(fig, path)
