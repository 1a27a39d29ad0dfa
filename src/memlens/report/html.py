"""The self-contained HTML report: sections saved as JSON, rebuilt into one page.

    index = build_report(out)      # out/index.html, figures embedded; out/summary.json

The sections are those the studies saved (:mod:`memlens.studies.section`: one
``section.json`` per directory under ``out``, beside its figures).

Every figure is embedded (PNG as a data URI, SVG inline), so the page needs no network and
no other file to be viewed or shared. A metric a section could not compute is stored as
``{"value": None, "reason": ...}`` (:mod:`memlens.missing`) and shown as "n/a (reason)".
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from memlens.missing import format_value, is_missing
from memlens.studies.section import Section, Table, jsonable, load_sections


def build_report(out: Path, *, title: str = "memlens report") -> Path:
    """Rebuild ``out/index.html`` and ``out/summary.json`` from the saved sections."""
    out = Path(out)
    sections = load_sections(out)
    summary = {
        section.key: {"title": section.title, "status": section.status, "model": section.model,
                      "seconds": section.seconds, "command": section.command, **section.summary}
        for _, section in sections
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=jsonable))
    body = "\n".join(_render_section(directory, section) for directory, section in sections)
    nav = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a></li>' for _, s in sections)
    page = _PAGE.format(
        title=html.escape(title),
        generated=time.strftime("%Y-%m-%d %H:%M"),
        nav=nav,
        body=body or "<p>No sections were saved.</p>",
    )
    index = out / "index.html"
    index.write_text(page)
    return index


def _render_section(directory: Path, section: Section) -> str:
    parts = [f'<section id="{section.key}" class="report-section status-{section.status}">',
             f"<h2>{html.escape(section.title)}</h2>"]
    meta = [("model", section.model), ("time", f"{section.seconds:.1f} s"),
            ("status", section.status)]
    parts.append("<p class=meta>" + " · ".join(
        f"<b>{k}</b> {html.escape(str(v))}" for k, v in meta) + "</p>")
    parts.append(f"<pre class=command>$ {html.escape(section.command)}</pre>")
    if section.text:
        parts.extend(f"<p>{html.escape(p)}</p>" for p in section.text.split("\n\n"))
    if section.summary:
        parts.append(_render_table(Table("Summary", ["metric", "value"],
                                         [[k, v] for k, v in section.summary.items()])))
    parts.extend(_render_table(table) for table in section.tables)
    for name in section.figures:
        parts.append(_render_figure(directory / name))
    if section.hparams:
        parts.append("<details><summary>hyper-parameters</summary><pre>"
                     + html.escape(json.dumps(section.hparams, indent=2, default=jsonable))
                     + "</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _format_cell(value: Any) -> str:
    """HTML of one table cell: 4 significant digits, a missing metric as "n/a (reason)"."""
    if is_missing(value):
        return f'<span class=missing>{html.escape(format_value(value))}</span>'
    if isinstance(value, float):
        return format_value(value)
    if isinstance(value, dict | list):
        return html.escape(json.dumps(value, default=jsonable))
    return html.escape(str(value))


def _render_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_format_cell(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return (f"<table><caption>{html.escape(table.title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _render_figure(path: Path) -> str:
    if not path.exists():
        return f"<p class=missing>figure {html.escape(path.name)} is missing</p>"
    if path.suffix == ".svg":
        svg = path.read_text()
        return f'<figure class=figure data-name="{html.escape(path.name)}">{svg}</figure>'
    data = base64.b64encode(path.read_bytes()).decode()
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return (f'<figure class=figure data-name="{html.escape(path.name)}">'
            f'<img alt="{html.escape(path.stem)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{html.escape(path.stem)}</figcaption></figure>")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
h1 {{ margin-bottom: 0; }} .generated {{ color: #777; margin-top: .2em; }}
nav ul {{ display: flex; flex-wrap: wrap; gap: 1em; list-style: none; padding: 0; }}
section {{ border-top: 2px solid #ddd; padding-top: .5em; margin-top: 2em; }}
.meta {{ color: #555; }} pre.command {{ background: #f4f4f4; padding: .6em; overflow-x: auto; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 90%; }}
caption {{ text-align: left; font-weight: bold; padding-bottom: .3em; }}
td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: .5em; vertical-align: top; }}
figure img, figure svg {{ max-width: 520px; height: auto; }}
.missing {{ color: #a60; }}
.status-skipped h2::after {{ content: " (skipped)"; color: #a60; }}
.status-failed h2::after {{ content: " (failed)"; color: #c00; }}
</style></head>
<body><h1>{title}</h1><p class=generated>generated {generated}</p>
<nav><ul>{nav}</ul></nav>
{body}
<script>
/* Marks each figure as rendered once the browser has laid it out (checked by the tests). */
window.addEventListener("load", () => {{
  document.querySelectorAll("figure.figure").forEach((fig) => {{
    const img = fig.querySelector("img"), svg = fig.querySelector("svg");
    const ok = img ? img.complete && img.naturalWidth > 0
                   : !!svg && svg.getBoundingClientRect().width > 0;
    fig.dataset.rendered = ok ? "yes" : "no";
  }});
  document.body.dataset.ready = "yes";
}});
</script>
</body></html>
"""
