"""The HTML report: built from saved sections, self-contained, and rendered by a real browser."""

from __future__ import annotations

import json
import re

import pytest

from memlens.report.browser import render_dom
from memlens.report.html import build_report
from memlens.studies.section import Section, Table


@pytest.fixture
def report_dir(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, order in (("trace", 1), ("rome", 2)):
        directory = tmp_path / key
        directory.mkdir()
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1, 2], [order, 2, 0])
        fig.savefig(directory / "curve.png")
        fig.savefig(directory / "curve.svg")
        plt.close(fig)
        Section(key=key, title=f"Section {key}", command=f"memlens {key} --model organism:tiny",
                model="organism:tiny", order=order, seconds=1.5, hparams={"samples": 10},
                summary={"score": 0.5 * order}, text="What it shows.",
                figures=["curve.png", "curve.svg"],
                tables=[Table("numbers", ["a", "b"], [[1, 2.0]])]).save(directory)
    return tmp_path


def test_report_is_self_contained(report_dir):
    index = build_report(report_dir)
    page = index.read_text()
    assert page.count('class="report-section') == 2
    assert page.index('id="trace"') < page.index('id="rome"')
    assert "data:image/png;base64," in page and "<svg" in page
    assert not re.search(r'(src|href)="(?!data:|#)', page), "report links an external resource"
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["rome"]["score"] == 1.0 and summary["trace"]["command"].startswith("memlens")


def test_report_renders_in_headless_chromium(report_dir, chromium):
    index = build_report(report_dir)
    dom = render_dom(index)
    assert 'data-ready="yes"' in dom, "the page's load handler did not run"
    sections = re.findall(r'<section id="(\w+)"', dom)
    assert sections == ["trace", "rome"]
    rendered = re.findall(r'data-rendered="(\w+)"', dom)
    assert rendered == ["yes"] * 4, rendered


def test_cli_report_rebuilds(report_dir):
    from typer.testing import CliRunner

    from memlens.cli import app

    result = CliRunner().invoke(app, ["report", str(report_dir)])
    assert result.exit_code == 0, result.output
    assert (report_dir / "index.html").exists()


def test_cli_report_screenshot_is_a_png_of_the_page(report_dir, chromium):
    from typer.testing import CliRunner

    from memlens.cli import app

    png = report_dir / "shot.png"
    result = CliRunner().invoke(app, ["report", str(report_dir), "--screenshot", str(png),
                                      "--width", "800", "--height", "600"])
    assert result.exit_code == 0, result.output
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") == 800  # IHDR width


def test_missing_metrics_carry_their_reason(tmp_path):
    """A metric that cannot be computed is {"value": None, "reason"}: found by `unexplained`
    only when bare, shown as "n/a (reason)" in a report table."""
    from memlens.missing import explain, format_value, missing, unexplained

    gone = missing("no fact was traced")
    assert explain(float("nan"), "no fact was traced") == gone and explain(0.25, "x") == 0.25
    assert format_value(gone) == "n/a (no fact was traced)" and format_value(1 / 3) == "0.3333"
    data = {"ok": [1.0, gone, {"pre": gone}], "bad": [float("nan")], "worse": {"x": None}}
    assert unexplained(data) == ["$.bad[0]", "$.worse.x"]
    with pytest.raises(ValueError):
        missing("")
    Section(key="trace", title="t", command="memlens trace", model="m",
            summary={"ATE": gone}, tables=[Table("peaks", ["kind", "max"], [["mlp", gone]])]
            ).save(tmp_path / "trace")
    page = build_report(tmp_path).read_text()
    assert page.count("n/a (no fact was traced)") == 2 and ">nan<" not in page
    assert unexplained(json.loads((tmp_path / "summary.json").read_text())) == []
