"""Figures and the self-contained HTML report that ``memlens demo`` and ``memlens report`` write."""
