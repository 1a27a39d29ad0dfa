"""Where memlens keeps what it computes once and reuses: ``$MEMLENS_HOME`` (default
``~/.cache/memlens``), one sub-directory per kind of result.

    cache_dir("stats")   # key statistics        cache_dir("organisms")  # trained organisms
    cache_dir("traces")  # causal-trace records  cache_dir("context")    # context templates
"""

from __future__ import annotations

import os
from pathlib import Path

BUILDING = ".building-"  # an organism build trains into cache_dir("organisms") / BUILDING + NAME


def memlens_home() -> Path:
    """``$MEMLENS_HOME`` or ``~/.cache/memlens`` (not created)."""
    return Path(os.environ.get("MEMLENS_HOME") or Path.home() / ".cache" / "memlens")


def cache_dir(kind: str) -> Path:
    """``memlens_home() / kind`` (not created)."""
    return memlens_home() / kind
