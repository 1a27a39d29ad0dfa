"""Typed hyper-parameters of editors, with per-family defaults and a JSON/YAML file override.

    hp = ROMEHyperParams.for_model(handle)                   # family defaults
    hp = ROMEHyperParams.for_model(handle, path="rome.yaml", v_lr=0.3)   # file, then keywords
    hp.to_dict()                                             # echoed into every result

Defaults follow the ROME reference hyper-parameters (gpt2-xl / gpt-j-6B share them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from memlens.errors import MemlensError
from memlens.files import read_text

FactToken = Literal["subject_last", "subject_first", "last"]
FACT_TOKENS = ("subject_last", "subject_first", "last")

H = TypeVar("H", bound="HyperParams")


class InvalidHyperParams(MemlensError):
    """A hyper-parameter file or value is malformed."""


@dataclass(frozen=True)
class HyperParams:
    """Base of every editor's config: family defaults, file overrides, JSON round trip."""

    #: model_type → field overrides on top of the dataclass defaults.
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: overrides for memlens' model organisms (a directory with organism.json), after the family's
    ORGANISM_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def for_model(cls: type[H], handle_or_type: Any = None, *, path: str | Path | None = None,
                  **overrides: Any) -> H:
        """Defaults for the model's family (and for organisms, ``ORGANISM_DEFAULTS``), then
        ``path`` (JSON/YAML), then ``overrides``."""
        is_handle = not (isinstance(handle_or_type, str) or handle_or_type is None)
        model_type = handle_or_type.arch.model_type if is_handle else handle_or_type
        values: dict[str, Any] = dict(cls.FAMILY_DEFAULTS.get(model_type or "", {}))
        source = getattr(handle_or_type, "source_dir", None) if is_handle else None
        if source is not None and (Path(source) / "organism.json").is_file():
            values.update(cls.ORGANISM_DEFAULTS)
        if path is not None:
            values.update(read_config_file(path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls: type[H], values: dict[str, Any]) -> H:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidHyperParams(f"unknown {cls.__name__} key(s) {unknown}; valid keys: "
                                     f"{', '.join(sorted(known))}")
        coerced = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                   if isinstance(v, list) else v for k, v in values.items()}
        hp = cls(**coerced)
        hp.check()
        return hp

    def check(self) -> None:
        """Raise InvalidHyperParams on values that cannot work (overridden per editor)."""

    def replace(self: H, **changes: Any) -> H:
        hp = replace(self, **changes)
        hp.check()
        return hp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a .json or .yaml/.yml file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidHyperParams(f"hyper-parameter file {str(path)!r} does not exist")
    text = read_text(path, "hyper-parameter file")
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InvalidHyperParams(f"{path} is YAML but PyYAML is not installed; "
                                         "pip install pyyaml or use JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise InvalidHyperParams(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidHyperParams(f"{path} must hold a mapping of hyper-parameters")
    return data


def check_delta_settings(hp: Any) -> None:
    """The checks every editor that optimises δ at a fact token (ROME's v*, MEMIT's z) needs:
    a known ``fact_token`` and a usable optimisation (steps ≥ 1, lr > 0, clamp > 0)."""
    if hp.fact_token not in FACT_TOKENS:
        raise InvalidHyperParams(f"fact_token must be one of {FACT_TOKENS}, "
                                 f"got {hp.fact_token!r}")
    if hp.v_num_grad_steps < 1 or hp.v_lr <= 0 or hp.clamp_norm_factor <= 0:
        raise InvalidHyperParams("v_num_grad_steps ≥ 1, v_lr > 0 and clamp_norm_factor > 0 "
                                 f"are required, got {hp.to_dict()}")


#: The forms of the ROME update, explained in :mod:`memlens.edit.rome`.
ROME_UPDATES = ("mean", "legacy", "both")


@dataclass(frozen=True)
class ROMEHyperParams(HyperParams):
    """ROME (Meng et al. 2022 §3) settings; defaults = the reference's gpt2-xl.json."""

    layer: int | None = None  # None: from a causal trace when available, else the middle layer
    fact_token: FactToken = "subject_last"  # where k is read and v written
    v_lr: float = 0.5  # Adam learning rate of δ
    v_num_grad_steps: int = 20  # at most this many steps
    v_stop_loss: float = 0.05  # stop when the total loss falls below this
    v_weight_decay: float = 0.5  # weight of ‖δ‖ / ‖v₀‖²
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖v₀‖
    kl_factor: float = 0.0625  # weight of KL(edited ‖ original) on kl_prompt
    kl_prompt: str = "{} is a"  # essence prompt whose distribution must not drift
    mom2_adjustment: bool = True  # use C⁻¹ k* (False: plain k*, the "no covariance" ablation)
    mom2_n_samples: int = 1000  # corpus samples for C = E[k kᵀ]
    mom2_max_len: int = 256  # tokens per sample (≤ the model's context)
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (tokens, count)
    context_seed: int = 0  # seed of the template sampler
    update: str = "mean"  # which keys the rank-one update inserts (ROME_UPDATES; memlens.edit.rome)

    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2": {}, "gpt_neo": {}, "gptj": {}, "gpt_neox": {},
        # Llama-family MLPs are gated (SwiGLU); the reference values carry over.
        "llama": {}, "mistral": {}, "qwen2": {},
    }
    #: Organisms (docs/editing.md, "ROME on the default organism"): MLP outputs at the subject
    #: need changes several times ‖v₀‖ (clamp 20·‖v₀‖, light decay) and more than 20 Adam steps
    #: (ES 0.925 → 1.0 at 40 on 40 cases of facts-gpt2); the reference's bare-key update reaches
    #: their bare CounterFact prompts, where the averaged key's ("mean") reached ES 0.55; their
    #: MLPs 0 and 1 write the subject's attributes (trace), and layer 0 edits best (PS 0.925 vs
    #: 0.65 at layer 1, which per-request traces chose 9 times in 12).
    ORGANISM_DEFAULTS: ClassVar[dict[str, Any]] = {"clamp_norm_factor": 20.0,
                                                   "v_weight_decay": 0.05,
                                                   "v_num_grad_steps": 40,
                                                   "update": "legacy",
                                                   "layer": 0}

    def check(self) -> None:
        check_delta_settings(self)
        if "{}" not in self.kl_prompt:
            raise InvalidHyperParams(f"kl_prompt {self.kl_prompt!r} needs '{{}}' for the subject")
        if self.update not in ROME_UPDATES:
            raise InvalidHyperParams(f"update must be one of {', '.join(ROME_UPDATES)}, "
                                     f"got {self.update!r}")
