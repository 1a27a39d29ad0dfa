"""What a study saves for the report: one ``section.json`` per section, beside its figures.

    section = Section(key="trace", title="Causal tracing", command="memlens trace ...",
                      model="organism:facts-gpt2", figures=["hidden.png"], ...)
    section.save(out / "trace")                  # out/trace/section.json (+ its figures)
    sections = load_sections(out)                # every saved section, in report order

The studies (:mod:`memlens.studies.demo`) write sections; :mod:`memlens.report.html` reads them
back and renders the page, so a report can be rebuilt without recomputing anything. A metric a
section could not compute is stored as ``{"value": None, "reason": ...}`` (:mod:`memlens.missing`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTION_FILE = "section.json"


@dataclass
class Table:
    """A small table of results: column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    """One capability's part of the report, with everything needed to rerun it."""

    key: str  # directory name and HTML anchor, e.g. "trace"
    title: str
    command: str  # the equivalent CLI command
    model: str
    order: int = 0  # position in the report
    status: str = "ok"  # ok | skipped | failed
    seconds: float = 0.0
    hparams: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # headline numbers
    text: str = ""  # what the numbers show, in a few sentences
    figures: list[str] = field(default_factory=list)  # file names inside the section directory
    tables: list[Table] = field(default_factory=list)

    def save(self, directory: Path) -> Path:
        """Write ``directory/section.json`` (figures are expected in ``directory``)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SECTION_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=jsonable))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Section:
        data = json.loads(Path(path).read_text())
        data["tables"] = [Table(**table) for table in data.get("tables", [])]
        return cls(**data)


def jsonable(value: Any) -> Any:
    """``json.dumps``' ``default``: arrays and tensors as lists, anything else as its str."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def load_sections(out: Path) -> list[tuple[Path, Section]]:
    """Every saved section under ``out``, in report order."""
    found = [(p.parent, Section.load(p)) for p in sorted(Path(out).glob(f"*/{SECTION_FILE}"))]
    return sorted(found, key=lambda item: (item[1].order, item[1].key))
