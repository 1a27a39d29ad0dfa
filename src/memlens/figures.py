"""Figures without a display: matplotlib on its Agg backend, and saving one figure to a file.

    plt = pyplot()                                    # matplotlib.pyplot, Agg backend
    fig, ax = plt.subplots()
    save_figure(fig, out / "scaling.png")             # parent created, figure closed
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

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
