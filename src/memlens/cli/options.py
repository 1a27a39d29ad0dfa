"""What the command groups share, defined once: options, the console, JSON output, fact files.

    def command(model: ModelOpt = DEFAULT_MODEL, out: OutOpt = Path("x"), as_json: JsonOpt = False)
    print_json(result.to_json())                 # --json: machine-readable output only
    facts = chosen_facts(fact_file(model, facts), n, relation)      # --facts, --n, --relation

:func:`with_shared` gives commands whose long option lists are shared (knockout and lens,
memorization, topk) those options, declared once and handed to the command as one object.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.console import Console

from memlens.errors import MemlensError

console = Console()

DEFAULT_MODEL = "organism:facts-gpt2"

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local directory, or organism:NAME.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory for results and figures.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 or auto.")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Weights' precision: float32, bfloat16 or float16 (default: the checkpoint's). Statistics, solves and v*/z optimisation stay float32/float64.")]
TraceWindowOpt = Annotated[int | None, typer.Option("--window", help="Layers restored together "
                                                    "for mlp/attn (default: 10 on models of ≥ "
                                                    "28 layers, 10·L/48 on shallower ones).")]
CorpusOpt = Annotated[str | None, typer.Option(
    "--corpus", help="Text/JSONL file, dataset dir or HF dataset name (default: the model's "
    "corpus.txt).")]
HParamsOpt = Annotated[Path | None, typer.Option("--hparams", help="JSON/YAML file overriding "
                                                 "hyper-parameters.")]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="Layer to edit (default: from a "
                                              "causal trace, else the middle layer).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="CounterFact JSON (default: the "
                                             "model's counterfact.json).")]
AllowNoEffectOpt = Annotated[bool, typer.Option(
    "--allow-no-effect", help="Keep (and --save) an edit that did not take: P(target_new) did "
    "not rise, target_new is not preferred, or the optimisation loss did not fall.")]
SkipInvalidOpt = Annotated[bool, typer.Option(
    "--skip-invalid", help="Drop requests the model already satisfies instead of failing.")]
FactFileOpt = Annotated[Path | None, typer.Option("--facts", help="JSON list of facts "
                                                  "(known-facts or CounterFact format); "
                                                  "default: the organism's known_facts.json.")]
RelationOpt = Annotated[str | None, typer.Option("--relation", help="Comma-separated relations "
                                                 "to keep (facts with a 'relation' field).")]


def print_json(data: object) -> None:
    """Write ``data`` as JSON to stdout (no rich markup, so it pipes cleanly)."""
    typer.echo(json.dumps(data, indent=2, default=str))


def fact_file(model: str, facts: Path | None,
              missing: str = "--facts is required unless --model is organism:NAME") -> Path:
    """``--facts``, else the organism's known_facts.json; MemlensError(``missing``) when
    neither exists (a model that is not organism:NAME)."""
    if facts is not None:
        return facts
    from memlens.model import organism_file, organism_name

    if organism_name(model) is None:
        raise MemlensError(missing)
    return organism_file(model, "known_facts.json")


def chosen_facts(path: Path, n: int | None, relation: str | None) -> list[dict[str, str]]:
    """The facts of ``path`` (--facts), of the --relation(s) and thinned to --n."""
    from memlens.trace import load_facts, select_facts

    return select_facts(load_facts(path), n, relation.split(",") if relation else None)


def option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """One shared option of :func:`with_shared`: ``name: annotation = default``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def with_shared(shared: Sequence[inspect.Parameter]
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn ``fn(shared, **own)`` into a command whose options are the ``shared`` ones (in that
    order, first in --help) and then ``fn``'s own keyword options; ``fn`` receives the shared
    values as attributes of its first argument.

        @topk_app.command("all")
        @with_shared(TRAINING)
        def topk_all(training):             # training.organism, training.steps, ...
    """
    names = [p.name for p in shared]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]]

        def command(**values: Any) -> Any:
            return fn(SimpleNamespace(**{n: values.pop(n) for n in names}), **values)

        command.__signature__ = inspect.Signature([*shared, *own])  # type: ignore[attr-defined]
        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        return command

    return wrap
