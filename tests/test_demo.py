"""`memlens demo` end to end on the tiny organism (quick settings), checked in a real browser."""

from __future__ import annotations

import json
import re

import pytest

from memlens.missing import unexplained
from memlens.report.demo import run_demo
from memlens.studies.demo import SECTIONS, DemoConfig


@pytest.fixture(scope="module")
def demo_report(tiny_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    index = run_demo(out, DemoConfig.quick("organism:tiny"))
    return out, index


def test_demo_runs_every_section(demo_report):
    out, index = demo_report
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(SECTIONS)
    failed = {k: v for k, v in summary.items() if v["status"] != "ok"}
    assert not failed, failed
    for key, section in summary.items():
        assert section["command"].startswith("memlens"), key
        assert isinstance(section["seconds"], float) and section["seconds"] >= 0, key


def test_demo_states_why_any_number_is_missing(demo_report):
    """No NaN or bare None in summary.json, any section's summary or tables, or the page: a
    number that cannot be computed is {"value": null, "reason": ...} (memlens.missing)."""
    out, index = demo_report
    summary = json.loads((out / "summary.json").read_text())
    assert unexplained(summary) == []
    for key in summary:
        section = json.loads((out / key / "section.json").read_text())
        shown = {"summary": section["summary"], "tables": section["tables"]}
        assert unexplained(shown, f"${key}") == []
        cells = [cell for table in section["tables"] if not table["title"].startswith(
            "Generations") for row in table["rows"] for cell in row if isinstance(cell, str)]
        assert not [c for c in cells if re.search(r"\b(nan|NaN)\b|^None$", c)], key
    rome = json.loads((out / "rome" / "section.json").read_text())
    rs = next(row for row in rome["tables"][1]["rows"] if row[0] == "RS")
    assert all(isinstance(v, float) for v in rs[1:]), rs  # reference texts were found


def test_demo_report_renders_in_browser(demo_report, chromium):
    from memlens.report.browser import render_dom

    out, index = demo_report
    dom = render_dom(index)
    assert re.findall(r'<section id="(\w+)"', dom) == list(SECTIONS)
    rendered = re.findall(r'data-rendered="(\w+)"', dom)
    assert len(rendered) >= 5 and set(rendered) == {"yes"}, rendered
