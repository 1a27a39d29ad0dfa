"""The editors, by name: what each needs and how it edits a batch of requests.

    editor = get_editor("memit")                        # rome, memit, alphaedit, ft, ft-l
    plan = editor.prepare(handle, requests, layers=None, corpus="wiki.txt")
    plan.layers, plan.layer_source                      # [1, 2], "causal trace of 5 facts (…)"
    edits, extra = editor.apply(handle, requests[:10], plan)   # undo with e.undo(), newest first

Each :class:`Editor` declares its hyper-parameters (class and defaults), how it chooses the
layers it edits (its own rule, labelled by :func:`memlens.edit.layers.chosen_layers`), whether
it needs key statistics and context templates, and how it applies a batch. ``memlens eval
counterfact`` (:func:`memlens.evaluate.evaluate_counterfact`), ``memlens bench-edits``
(:func:`memlens.studies.scaling.bench_edits`) and the demo drive every editor through this
table, preparing once (layers, statistics, templates) and applying many times — so a new
editor is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memlens.edit.alphaedit import AlphaEditHyperParams, AlphaEditState, apply_alphaedit
from memlens.edit.finetune import FT_L_EPSILON, FTHyperParams, apply_ft, ft_layer
from memlens.edit.hparams import HyperParams, ROMEHyperParams
from memlens.edit.memit import MEMITHyperParams, apply_memit, memit_layers
from memlens.edit.requests import EditRequest
from memlens.edit.rome import apply_rome, rome_layer
from memlens.errors import MemlensError
from memlens.ledger import EditHandle


@dataclass
class Plan:
    """What an editor works with, fixed once before it edits: layers, settings, statistics."""

    editor: Editor
    layers: list[int]  # one layer for one-layer editors (ROME, FT), the band R for MEMIT
    layer_source: str  # "user", "hparams", or how a causal trace chose them
    hparams: Any
    stats: Mapping[int, Any] | None = None  # layer → KeyStats, when the editor uses C
    templates: list[str] | None = None  # context templates, when the editor uses them
    #: what an editor carries from one application to the next (AlphaEdit: the keys of its
    #: earlier edits still applied, memlens.edit.alphaedit.AlphaEditState)
    state: Any = None

    @property
    def layer(self) -> int:
        """The layer of a one-layer editor."""
        return self.layers[0]

    def to_dict(self) -> dict[str, Any]:
        """The setup a result records: editor, layer (or layers), layer_source, hparams."""
        where = {"layer": self.layer} if self.editor.one_layer else {"layers": self.layers}
        return {"editor": self.editor.name, **where, "layer_source": self.layer_source,
                "hparams": self.hparams.to_dict()}


#: ``apply(handle, requests, plan, check_current, skip_invalid, progress)`` → (edits, extra)
Apply = Callable[[Any, Sequence[EditRequest], Plan, bool, bool, bool],
                 tuple[list[EditHandle], dict[str, Any]]]


@dataclass(frozen=True)
class Editor:
    """One editor: its hyper-parameters, its layer rule, and how it applies a batch."""

    name: str
    description: str
    hparams_class: type[HyperParams]
    one_layer: bool  # edits one layer (ROME, FT) or a band of layers (MEMIT)
    #: (handle, requests, layer(s) given or None, hparams) → (layer or band, layer_source)
    choose: Callable[[Any, Sequence[EditRequest], Any, Any], tuple[Any, str]]
    run: Apply
    key_statistics: bool = False  # needs C = E[k kᵀ] (if its hparams.mom2_adjustment)
    context_templates: bool = False  # averages over context templates
    #: settings that make this editor what it is (FT-L: the L∞ bound), over the defaults
    fixed: dict[str, Any] = field(default_factory=dict)

    def hparams(self, handle: Any, *, path: Any = None, **overrides: Any) -> HyperParams:
        """The model's defaults for this editor (with ``fixed``), then ``path`` (JSON/YAML),
        then keywords."""
        return self.hparams_class.for_model(handle, path=path, **{**self.fixed, **overrides})

    def prepare(self, handle: Any, requests: Sequence[EditRequest], *,
                layers: int | Sequence[int] | None = None, hparams: Any = None,
                corpus: str | None = None, progress: bool = False) -> Plan:
        """Choose the layers (``layers``, else the hyper-parameters', else a causal trace of
        the first requests) and compute what every application shares: key statistics and
        context templates."""
        from memlens.edit.context import context_templates
        from memlens.stats import layer_stats

        hp = hparams or self.hparams(handle)
        given = None if layers is None else _as_given(layers, self.one_layer)
        chosen, source = self.choose(handle, list(requests), given, hp)
        chosen_list = [chosen] if self.one_layer else list(chosen)
        stats = layer_stats(handle, chosen_list, corpus=corpus, n_samples=hp.mom2_n_samples,
                            max_len=hp.mom2_max_len, progress=progress) \
            if self.key_statistics and hp.mom2_adjustment else None
        templates = context_templates(handle, hp.context_templates, seed=hp.context_seed) \
            if self.context_templates else None
        return Plan(self, chosen_list, source, hp, stats, templates)

    def apply(self, handle: Any, requests: Sequence[EditRequest], plan: Plan, *,
              check_current: bool = True, skip_invalid: bool = False,
              progress: bool = False) -> tuple[list[EditHandle], dict[str, Any]]:
        """Edit ``requests`` together (ROME: one after another, each on top of the others);
        the edits (undo them newest first) and what the result records about them, with the
        requests left out in ``extra["skipped"]`` when ``skip_invalid``. With
        ``check_current=False`` the requests were validated against the model as it is: a
        sequential editor still checks each later request against its earlier edits."""
        return self.run(handle, requests, plan, check_current, skip_invalid, progress)


def _as_given(layers: int | Sequence[int], one_layer: bool) -> Any:
    """The caller's layer(s) in the editor's form: an int (one layer) or a list (a band)."""
    if one_layer:
        return layers if isinstance(layers, int) else _single(layers)
    return [layers] if isinstance(layers, int) else list(layers)


def _single(layers: Sequence[int]) -> int:
    if len(layers) != 1:
        raise MemlensError(f"this editor edits one layer; got layers {list(layers)}")
    return int(layers[0])


def _apply_rome(handle: Any, requests: Sequence[EditRequest], plan: Plan, check_current: bool,
                skip_invalid: bool, progress: bool) -> tuple[list[EditHandle], dict[str, Any]]:
    edits, skipped = [], []
    for index, request in enumerate(requests):
        try:
            edits.append(apply_rome(handle, request, layer=plan.layer, hparams=plan.hparams,
                                    stats=plan.stats, templates=plan.templates,
                                    check_current=check_current or index > 0))
        except MemlensError as exc:
            if not skip_invalid:
                raise
            skipped.append({"case_id": request.case_id, "reason": str(exc)})
    return edits, {"layer": plan.layer, "skipped": skipped}


def _apply_memit(handle: Any, requests: Sequence[EditRequest], plan: Plan, check_current: bool,
                 skip_invalid: bool, progress: bool) -> tuple[list[EditHandle], dict[str, Any]]:
    edit = apply_memit(handle, requests, layers=plan.layers, hparams=plan.hparams,
                       stats=plan.stats, templates=plan.templates, check_current=check_current,
                       skip_invalid=skip_invalid, progress=progress)
    return [edit], {"layers": edit.layers, "z": edit.log["z"], "skipped": edit.log["skipped"]}


def _apply_alphaedit(handle: Any, requests: Sequence[EditRequest], plan: Plan,
                     check_current: bool, skip_invalid: bool, progress: bool
                     ) -> tuple[list[EditHandle], dict[str, Any]]:
    if plan.state is None:
        plan.state = AlphaEditState()
    edit = apply_alphaedit(handle, requests, layers=plan.layers, hparams=plan.hparams,
                           stats=plan.stats, templates=plan.templates, state=plan.state,
                           check_current=check_current, skip_invalid=skip_invalid,
                           progress=progress)
    return [edit], {"layers": edit.layers, "z": edit.log["z"], "skipped": edit.log["skipped"],
                    "nullspace": edit.log["nullspace"],
                    "earlier_edits": edit.log["earlier_edits"]}


def _apply_ft(handle: Any, requests: Sequence[EditRequest], plan: Plan, check_current: bool,
              skip_invalid: bool, progress: bool) -> tuple[list[EditHandle], dict[str, Any]]:
    edit = apply_ft(handle, requests, layer=plan.layer, hparams=plan.hparams,
                    check_current=check_current)
    return [edit], {"layer": plan.layer, "loss_last": edit.log["loss_last"],
                    "max_abs_change": edit.log["max_abs_change"]}


EDITORS: dict[str, Editor] = {e.name: e for e in [
    Editor("rome", "ROME: a rank-one update of one MLP matrix per fact, one fact at a time",
           ROMEHyperParams, one_layer=True, choose=rome_layer, run=_apply_rome,
           key_statistics=True, context_templates=True),
    Editor("memit", "MEMIT: many facts at once, spread over a band of MLP layers",
           MEMITHyperParams, one_layer=False, choose=memit_layers, run=_apply_memit,
           key_statistics=True, context_templates=True),
    Editor("alphaedit", "AlphaEdit: MEMIT with each update projected onto the null space of "
           "the preserved keys", AlphaEditHyperParams, one_layer=False, choose=memit_layers,
           run=_apply_alphaedit, key_statistics=True, context_templates=True),
    Editor("ft", "FT: fine-tune one MLP output matrix on the requests (unconstrained)",
           FTHyperParams, one_layer=True, choose=ft_layer, run=_apply_ft),
    Editor("ft-l", "FT-L: FT with |W − W₀| ≤ ε (the ROME paper's ε = 5e-4)",
           FTHyperParams, one_layer=True, choose=ft_layer, run=_apply_ft,
           fixed={"norm_constraint": FT_L_EPSILON}),
]}


def get_editor(name: str) -> Editor:
    """The editor called ``name``; MemlensError listing the known ones otherwise."""
    if name not in EDITORS:
        raise MemlensError(f"unknown editor {name!r}; choose {', '.join(EDITORS)} or none")
    return EDITORS[name]


__all__ = ["EDITORS", "Editor", "Plan", "get_editor"]
