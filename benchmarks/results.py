"""RESULTS.md, where every benchmark writes its own section."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(body: str) -> None:
    """Put `body` — a section that starts with its ``## title`` line — into RESULTS.md: in place
    of the section of that title (up to the next ``## ``), or at the end if there is none."""
    title = body.lstrip().splitlines()[0]
    body = body.strip() + "\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + body
    RESULTS.write_text(text.rstrip() + "\n")
    print(f"wrote {RESULTS}")
