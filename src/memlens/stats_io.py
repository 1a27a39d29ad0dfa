"""Key statistics in the ROME/MEMIT reference code's file layout, so published statistics are
reused instead of recomputed (and memlens' can be handed to the reference code).

    stats = import_reference_stats("wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz",
                                   layer=17, handle=handle)       # a memlens KeyStats
    export_reference_stats(stats, out_dir / reference_stats_name(handle, 17, n=100000))
    stats = ReferenceStatsDir("data/stats/gpt2-xl/wikipedia_stats", handle)   # every layer found
    apply_memit(handle, requests, stats=stats)     # CLI: memlens edit memit --stats-dir DIR

The reference saves a combined statistic with one member ``mom2`` (a running second moment)
through ``numpy.savez``: the keys ``mom2.constructor`` (the class, as text), ``mom2.count``
(tokens seen), ``mom2.mom2`` (the SUM Σ k kᵀ, not the mean; float32 unless it was computed in
float64) and ``sample_size`` (corpus samples asked for). memlens keeps the mean
C = Σ k kᵀ / N in float64, so import divides by the count and export multiplies back. Files
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlens.errors import MemlensError
from memlens.stats import KeyStats

CONSTRUCTOR = "util.runningstats.SecondMoment()"  # how the reference names the statistic


def reference_stats_name(handle: Any, layer: int, *, n: int, precision: str = "float32") -> str:
    """The reference's file name for ``layer``'s statistics: ``<edited module>_<precision>_mom2
    _<n>.npz`` (it keeps them under ``<stats dir>/<model>/<dataset>_stats/``)."""
    return f"{handle.arch.module_name(layer, 'mlp_out')}_{precision}_mom2_{n}.npz"


def import_reference_stats(path: str | Path, layer: int, *, handle: Any = None,
                           corpus: str | None = None) -> KeyStats:
    """A reference ``.npz`` second-moment file as :class:`~memlens.stats.KeyStats` of
    ``layer``; with ``handle``, its size is checked against the model's d_ff."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise MemlensError(f"cannot read reference statistics {path}: {exc}") from None
    if "mom2.mom2" not in arrays or "mom2.count" not in arrays:
        raise MemlensError(f"{path} is not a reference second-moment file: it lacks mom2.mom2 "
                           f"/ mom2.count (keys: {sorted(arrays)})")
    total, count = arrays["mom2.mom2"], int(arrays["mom2.count"])
    if total.ndim != 2 or total.shape[0] != total.shape[1] or count < 1:
        raise MemlensError(f"{path}: mom2 must be a square matrix with count ≥ 1, got shape "
                           f"{total.shape} and count {count}")
    if handle is not None and total.shape[0] != handle.d_ff:
        raise MemlensError(f"{path} holds {total.shape[0]}-dimensional keys; layer {layer} of "
                           f"{handle.ref!r} has d_ff = {handle.d_ff}")
    sample_size = int(arrays["sample_size"]) if "sample_size" in arrays \
        and np.isfinite(arrays["sample_size"]) else 0
    stats = KeyStats(layer=layer, mom2=torch.from_numpy(total.astype(np.float64)) / count,
                     count=count, corpus=corpus or f"reference:{path.name}",
                     n_samples=sample_size,
                     fingerprint=handle.fingerprint() if handle is not None else "")
    stats.check_finite()
    return stats


def export_reference_stats(stats: KeyStats, path: str | Path, *,
                           precision: str = "float32") -> Path:
    """Write ``stats`` in the reference layout (written atomically); returns the path."""
    if precision not in ("float32", "float64"):
        raise MemlensError(f"precision must be float32 or float64, got {precision!r}")
    path = Path(path)
    total = (stats.mom2.double() * stats.count).cpu().numpy().astype(precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **{"mom2.constructor": np.array(CONSTRUCTOR),
                         "mom2.count": np.array(stats.count),
                         "mom2.mom2": total, "sample_size": np.array(stats.n_samples)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class ReferenceStatsDir(Mapping[int, KeyStats]):
    """The reference code's statistics files of ``handle``'s layers in ``directory`` (named
    as :func:`reference_stats_name` names them), each read when it is looked up: a fresh,
    checked, ``disposable`` :class:`KeyStats`, so an edit holds one C at a time and may solve
    in its buffer. Where several files hold one layer (other sample counts or precisions), the
    one of the most samples is used. Layers without a file are not in the mapping; the editors
    compute those from their corpus as usual."""

    def __init__(self, directory: str | Path, handle: Any):
        self.directory, self.handle = Path(directory), handle
        if not self.directory.is_dir():
            raise MemlensError(f"statistics directory {self.directory} does not exist")
        self.files: dict[int, Path] = {}
        for layer in range(handle.n_layers):
            module = handle.arch.module_name(layer, "mlp_out")
            found = [(int(match.group(1)), path) for path in
                     self.directory.glob(f"{glob.escape(module)}_*_mom2_*.npz")
                     if (match := re.search(r"_mom2_(\d+)\.npz$", path.name))]
            if found:
                self.files[layer] = max(found)[1]
        if not self.files:
            raise MemlensError(f"{self.directory} holds no reference statistics of "
                               f"{handle.ref!r}: expected files named like "
                               f"{reference_stats_name(handle, 0, n=100000)}")

    def __getitem__(self, layer: int) -> KeyStats:
        if layer not in self.files:
            raise KeyError(layer)
        stats = import_reference_stats(self.files[layer], layer, handle=self.handle)
        stats.disposable = True
        return stats

    def __contains__(self, layer: object) -> bool:  # Mapping's would read C
        return layer in self.files

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.files))

    def __len__(self) -> int:
        return len(self.files)

