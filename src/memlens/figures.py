"""Figures without a display: matplotlib on its Agg backend, and saving one figure to a file.

    plt = pyplot()                                    # matplotlib.pyplot, Agg backend
    fig, ax = plt.subplots()
    save_figure(fig, out / "scaling.png")             # parent created, figure closed
    return finish_figure(fig, path)                   # the path, or (path None) the figure

The ``plot_*`` functions that write a file take its path as optional: with one they write it
and return the path, without one they return the matplotlib ``Figure``, which a Jupyter notebook
shows inline when a cell ends with it (the knockout, lens and probe plots always return it). In a Jupyter kernel (``MPLBACKEND`` names the inline
backend) :func:`pyplot` keeps that backend instead of switching to Agg.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use;
    a Jupyter kernel's inline backend is kept (it needs no display either)."""
    import matplotlib

    if "inline" not in os.environ.get("MPLBACKEND", ""):
        matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (its directory created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def finish_figure(fig: Any, path: str | Path | None = None, *, dpi: int = 120) -> Any:
    """The end of a ``plot_*`` function: with ``path``, :func:`save_figure` (the path is
    returned); without, the figure is released from pyplot (no second copy is drawn at the end
    of a notebook cell, nothing accumulates) and returned, still drawable and savable."""
    if path is not None:
        return save_figure(fig, path, dpi=dpi)
    pyplot().close(fig)
    return fig
