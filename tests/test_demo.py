"""`memlens demo` end to end on the tiny organism (quick settings), checked in a real browser."""

from __future__ import annotations

import json
import re

import pytest

from memlens.report.demo import SECTIONS, DemoConfig, run_demo


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


def test_demo_report_renders_in_browser(demo_report, chromium):
    from memlens.report.browser import render_dom

    out, index = demo_report
    dom = render_dom(index)
    assert re.findall(r'<section id="(\w+)"', dom) == list(SECTIONS)
    rendered = re.findall(r'data-rendered="(\w+)"', dom)
    assert len(rendered) >= 5 and set(rendered) == {"yes"}, rendered
