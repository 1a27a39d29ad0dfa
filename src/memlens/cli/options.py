"""What the command groups share, defined once: options, the console, JSON output, fact files.

    def command(model: ModelOpt = DEFAULT_MODEL, out: OutOpt = Path("x"), as_json: JsonOpt = False)
    print_json(result.to_json())                 # --json: machine-readable output only
    facts = chosen_facts(fact_file(model, facts), n, relation)      # --facts, --n, --relation

:func:`with_shared` gives commands whose long option lists are shared (knockout and lens,
memorization, topk) those options, declared once and handed to the command as one object.
:func:`offer_device_map` adds --device-map and --offload-folder to every command that has
--device (``memlens.cli`` applies it once to the whole app).
"""

from __future__ import annotations

import functools
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
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="Spread the model with accelerate: auto, balanced, sequential, or a "
    'JSON file of module name → device ({"transformer.h.0": "cuda:0", "transformer.h.1": '
    '"disk", ...}). Instead of --device.')]
OffloadFolderOpt = Annotated[Path | None, typer.Option(
    "--offload-folder", help="Directory for weights the device map sends to \"disk\" (needed "
    "only for checkpoints that are not safetensors).")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Weights' precision: float32, bfloat16 or float16 (default: the checkpoint's). Statistics, solves and v*/z optimisation stay float32/float64.")]
TraceWindowOpt = Annotated[int | None, typer.Option("--window", help="Layers restored together "
                                                    "for mlp/attn (default: 10 on models of ≥ "
                                                    "28 layers, 10·L/48 on shallower ones).")]
CorpusOpt = Annotated[str | None, typer.Option(
    "--corpus", help="Text/JSONL file, dataset dir or HF dataset name (default: the model's "
    "corpus.txt).")]
StatsDirOpt = Annotated[Path | None, typer.Option(
    "--stats-dir", help="Directory of published key statistics in the ROME/MEMIT reference "
    "code's layout (<module>_float32_mom2_<n>.npz): used for the layers it holds instead of "
    "computing them from --corpus.")]
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


def with_device_map(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with --device-map and --offload-folder after its --device (``DeviceOpt``); when
    either is given, ``fn`` receives ``device=Placement(device, device_map, offload_folder)``,
    which it hands to :func:`memlens.model.load_model` as before. ``fn`` itself when it has no
    --device."""
    signature = inspect.signature(fn, eval_str=True)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.name == "device"
               and p.annotation is DeviceOpt), None)
    if at is None or "device_map" in signature.parameters:
        return fn
    kind = params[at].kind
    added = [inspect.Parameter("device_map", kind, default=None, annotation=DeviceMapOpt),
             inspect.Parameter("offload_folder", kind, default=None,
                               annotation=OffloadFolderOpt)]

    @functools.wraps(fn)
    def command(*args: Any, **values: Any) -> Any:
        device_map, offload_folder = values.pop("device_map"), values.pop("offload_folder")
        if device_map is not None or offload_folder is not None:
            from memlens.model import Placement

            values["device"] = Placement(values.get("device"), device_map, offload_folder)
        return fn(*args, **values)

    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*params[:at + 1], *added, *params[at + 1:]])
    return command


def offer_device_map(app: typer.Typer) -> None:
    """Give every command of ``app`` (and of its groups) that has --device the options of
    :func:`with_device_map`: declared once here instead of in each command."""
    for info in app.registered_commands:
        if info.callback is not None:
            info.callback = with_device_map(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            offer_device_map(group.typer_instance)


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
