"""``memlens demo``: the whole story on the default organism, as a report a researcher would share.

    index = run_demo(Path("memlens-report"))                  # every section, then the HTML
    index = run_demo(out, DemoConfig.quick("organism:tiny"))   # seconds-scale settings (tests)

The sections (causal tracing, ROME, MEMIT, memorization, TopK) are the experiments of
:mod:`memlens.studies.demo`; this module runs them and renders ``out/index.html`` and
``out/summary.json`` from what they saved (:mod:`memlens.report.html`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from memlens.report.html import build_report
from memlens.studies.demo import DemoConfig, run_sections


def run_demo(out: Path, config: DemoConfig | None = None) -> Path:
    """Run the configured sections on ``config.model``; write ``out/index.html`` and summary."""
    config = config or DemoConfig()
    out = Path(out)
    run_sections(out, config)
    index = build_report(out, title=f"memlens report: {config.model}")
    (out / "demo_config.json").write_text(json.dumps(asdict(config), indent=1))
    return index


__all__ = ["run_demo"]
