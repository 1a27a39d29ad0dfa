"""The table of one model, or of a model against its twin: value ± standard error per (task,
metric), and the gap between the two with a standard error paired over the same items.

    rows = compare({"model": measures_topk, "twin": measures_dense}, order)
    table = EvalTable(models, rows, settings)
    table.row("my_cloze", "acc").gap, table.row("my_cloze", "acc").gap_stderr
    print(table.to_markdown()); plot_table(table, "eval.png")

The gap is model − twin for accuracies and model / twin for perplexities. Its standard error is
that of the mean per-item difference (of NLLs, for a ratio) when both models have per-item
values of the same kind — much smaller than the two models' own errors suggest, because both
find the same items hard — else from the two standard errors as if independent (``paired``
says which).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memlens.evaluate.harness import HELDOUT, Measure
from memlens.figures import finish_figure, pyplot
from memlens.missing import format_value, is_missing, missing

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class MetricRow:
    """One (task, metric): each model's value ± standard error, and the gap between them."""

    task: str
    metric: str
    higher_is_better: bool
    n: int  # items (documents, or held-out blocks)
    source: str  # "harness" or "memlens"
    values: dict[str, Any]  # role ("model", "twin") → value, or a missing() dict
    stderrs: dict[str, Any]
    gap: Any = None  # model − twin (accuracies) or model / twin (perplexities); None: no twin
    gap_stderr: Any = None
    gap_kind: str = "difference"  # or "ratio"
    paired: bool = False  # gap_stderr over paired items (else from the two stderrs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalTable:
    """The evaluation of a model (and its twin): rows, models, settings, written files."""

    models: dict[str, dict]  # role → {"ref", "label", "topk"}
    rows: list[MetricRow]
    settings: dict
    files: dict[str, str] = field(default_factory=dict)

    def row(self, task: str, metric: str) -> MetricRow:
        for r in self.rows:
            if (r.task, r.metric) == (task, metric):
                return r
        raise KeyError(f"no row {task}/{metric}; rows: {[(r.task, r.metric) for r in self.rows]}")

    def to_dict(self) -> dict:
        return {"models": self.models, "rows": [r.to_dict() for r in self.rows],
                "settings": self.settings, "files": self.files}

    @classmethod
    def from_dict(cls, data: dict) -> EvalTable:
        """The table of a saved ``eval.json`` (to re-plot or re-render it)."""
        return cls(models=data["models"], rows=[MetricRow(**r) for r in data["rows"]],
                   settings=data["settings"], files=data.get("files", {}))

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) as text: value ± standard error, gap ± its standard error."""
        roles = list(self.models)
        labels = [self.models[role]["label"] for role in roles]
        header = ["task", "metric", "n", *labels]
        if len(roles) == 2:
            header.append(f"{labels[0]} vs {labels[1]}")
        rows = []
        for r in self.rows:
            cells = [r.task, f"{r.metric} {'↑' if r.higher_is_better else '↓'}", str(r.n)]
            decimals = _decimals(list(r.values.values()))
            cells += [_pm(r.values.get(role), r.stderrs.get(role), decimals) for role in roles]
            if len(roles) == 2:
                cells.append(_gap_cell(r))
            rows.append(cells)
        return header, rows

    def to_markdown(self) -> str:
        """The table as GitHub markdown, with notes on the models and the standard errors."""
        header, rows = self.cells()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        roles = list(self.models)
        return "\n".join(lines + [""] + self._notes(roles, header[3:3 + len(roles)])) + "\n"

    def _notes(self, roles: list[str], labels: list[str]) -> list[str]:
        s = self.settings
        notes = ["Models: " + "; ".join(f"{self.models[role]['label']} = "
                                        f"`{self.models[role]['ref']}`" for role in roles) + ".",
                 f"± one standard error. Harness (lm-eval {s.get('lm_eval_version')}): acc "
                 f"binomial, perplexity bootstrap ({s.get('bootstrap_iters')} resamples); "
                 f"{HELDOUT}: delta method over blocks."]
        if len(roles) == 2:
            notes.append(f"Last column: {labels[0]} − {labels[1]} (accuracies) or "
                         f"{labels[0]} / {labels[1]} (×, perplexities), standard error paired "
                         "over the same items" + ("" if all(r.paired for r in self.rows) else
                                                  " where per-item values exist (else unpaired)")
                         + ".")
        return notes


def compare(measures: dict[str, dict[tuple[str, str], Measure]],
            order: list[tuple[str, str]]) -> list[MetricRow]:
    """Rows of ``order`` from each role's measures; with two roles, the gap of the first over
    the second (paired over common items when both have per-item values of the same kind)."""
    roles = list(measures)
    rows = []
    for task, metric in order:
        got = {role: measures[role].get((task, metric)) for role in roles}
        first = next(m for m in got.values() if m is not None)
        reason = "this model has no such metric"
        row = MetricRow(task=task, metric=metric, higher_is_better=first.higher_is_better,
                        n=first.n, source=first.source,
                        values={r: m.value if m else missing(reason) for r, m in got.items()},
                        stderrs={r: m.stderr if m else missing(reason) for r, m in got.items()})
        if len(roles) == 2:
            _gap(row, got[roles[0]], got[roles[1]], metric)
        rows.append(row)
    return rows


def _gap(row: MetricRow, a: Measure | None, b: Measure | None, metric: str) -> None:
    ratio = (a or b).kind == "nll" or (not (a or b).higher_is_better and "perplexity" in metric)
    row.gap_kind = "ratio" if ratio else "difference"
    if a is None or b is None or not is_number(a.value) or not is_number(b.value):
        row.gap = row.gap_stderr = missing("a model has no value for this metric")
        return
    row.gap = a.value / b.value if ratio else a.value - b.value
    common = sorted(set(a.items) & set(b.items))
    if a.kind is not None and a.kind == b.kind and len(common) > 1:
        diff = [a.items[i] - b.items[i] for i in common]
        se = statistics.stdev(diff) / math.sqrt(len(diff))  # of mean(a − b): log ratio for NLLs
        row.gap_stderr = row.gap * se if ratio else se
        row.paired = True
    elif is_number(a.stderr) and is_number(b.stderr):
        row.gap_stderr = (row.gap * math.hypot(a.stderr / a.value, b.stderr / b.value) if ratio
                          else math.hypot(a.stderr, b.stderr))
    else:
        row.gap_stderr = missing("no per-item values and no standard error of a model")


def plot_table(table: EvalTable, path: str | Path | None = None) -> Path | Figure:
    """Bars per (task, metric) and model with ±1 standard error: accuracies left, perplexities
    (log scale) right.

        plot_table(EvalTable.from_dict(json.loads(Path("eval.json").read_text())), "eval.png")
    """
    plt = pyplot()
    panels = {"accuracy (↑)": [r for r in table.rows if r.higher_is_better],
              "perplexity (↓)": [r for r in table.rows if not r.higher_is_better]}
    panels = {title: rows for title, rows in panels.items() if rows}
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4),
                             squeeze=False)
    roles = list(table.models)
    width = 0.8 / len(roles)
    for ax, (title, rows) in zip(axes[0], panels.items(), strict=False):
        for j, role in enumerate(roles):
            xs = [i + (j - (len(roles) - 1) / 2) * width for i in range(len(rows))]
            ys = [r.values[role] if is_number(r.values[role]) else 0.0 for r in rows]
            errs = [r.stderrs[role] if is_number(r.stderrs[role]) else 0.0 for r in rows]
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=table.models[role]["label"])
        ax.set_xticks(range(len(rows)), [f"{r.task}\n{r.metric}" for r in rows], fontsize=8)
        ax.set_title(title)
        if title.startswith("perplexity"):
            _log_axis(ax)
        ax.legend()
    fig.suptitle(" vs ".join(m["label"] for m in table.models.values()) + " (±1 s.e.)")
    fig.tight_layout()
    return finish_figure(fig, path)


def _log_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _gap_cell(r: MetricRow) -> str:
    if is_missing(r.gap):
        return format_value(r.gap)
    ratio = r.gap_kind == "ratio"
    sign = "×" if ratio else ("+" if is_number(r.gap) and r.gap >= 0 else "")
    return sign + _pm(r.gap, r.gap_stderr, 3 if ratio else 4)


def _pm(value: Any, stderr: Any, decimals: int) -> str:
    """``value ± stderr`` with ``decimals`` decimals, or the reason a value is missing."""
    if not is_number(value):
        return format_value(value) if value is not None else "—"
    text = f"{value:,.{decimals}f}"
    return text + (f" ± {stderr:,.{decimals}f}" if is_number(stderr) else "")


def _decimals(values: list[Any]) -> int:
    """Decimals for a row: 4 below 1, else 4 significant digits of the largest value."""
    largest = max((abs(v) for v in values if is_number(v)), default=0.0)
    return 4 if largest < 1 else max(0, 3 - int(math.floor(math.log10(largest))))


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not a missing() dict)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
