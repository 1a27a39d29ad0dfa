"""Metrics that cannot be computed: written as ``null`` with the reason next to it, never as NaN.

    missing("no reference texts")        # {"value": None, "reason": "no reference texts"}
    explain(float("nan"), "no facts")    # the same shape; a number passes through unchanged
    format_value(missing("no facts"))    # "n/a (no facts)" for CLI tables and the HTML report
    unexplained(json.loads(text))        # paths of NaN/None values that carry no reason

The convention, used by every report section, ``summary.json``, ``--json`` output and result
file that memlens writes: a metric is either a number or the dict ``{"value": null, "reason":
"..."}`` in its place (inside a ``{"pre": ..., "post": ...}`` pair, a table row, a summary).
A bare NaN or ``None`` where a metric belongs is a bug; :func:`unexplained` finds them (the
tests walk the demo's JSON and ``memlens eval counterfact --json`` with it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REASON = "reason"


def missing(reason: str) -> dict[str, Any]:
    """The JSON stand-in for a metric that cannot be computed, saying why."""
    if not reason:
        raise ValueError("a missing metric needs a reason")
    return {"value": None, REASON: reason}


def is_nan(value: Any) -> bool:
    """True for ``None`` and float NaN: a value that is not a number."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_missing(value: Any) -> bool:
    """True for a :func:`missing` dict."""
    return isinstance(value, Mapping) and value.get("value") is None and bool(value.get(REASON))


def explain(value: Any, reason: str) -> Any:
    """``value`` when it is a number (or anything but None/NaN), else ``missing(reason)``."""
    return missing(reason) if is_nan(value) else value


def format_value(value: Any, digits: int = 4) -> str:
    """A cell of a CLI or HTML table: floats to ``digits`` significant digits, a missing metric
    as ``n/a (reason)``."""
    if is_missing(value):
        return f"n/a ({value[REASON]})"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def unexplained(data: Any, path: str = "$") -> list[str]:
    """JSON paths (``$.rome.tables[1].rows[3][2]``) of every NaN or ``None`` in ``data`` that is
    not the ``value`` of a dict with a non-empty ``reason``."""
    if is_nan(data):
        return [path]
    if isinstance(data, Mapping):
        if is_missing(data):
            return []
        return [p for key, item in data.items() for p in unexplained(item, f"{path}.{key}")]
    if isinstance(data, list | tuple):
        return [p for i, item in enumerate(data) for p in unexplained(item, f"{path}[{i}]")]
    return []


__all__ = ["explain", "format_value", "is_missing", "is_nan", "missing", "unexplained"]
