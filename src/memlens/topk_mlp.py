"""The TopK MLP of Takahashi et al. (2025): the activation, and a model converted to it (in
memory), saved and loaded back from its config.

    act = TopK(k=64)                           # y = f(x) ⊙ 1{x ≥ τ_k(x)}, f = ReLU
    y = act(torch.randn(2, 5, 1024))           # exactly k units per position are kept
    alpha_at(step=50, total_steps=1000, anneal_ratio=0.2)   # 0.75: linear 1 → 0 over 20% of steps
    settings = to_topk(model, k=64)            # all but the last 2 layers get TopK_64(ReLU)
    model.config.topk                           # {'k': 64, 'layers': [0, 1, 2, 3], ...}
    set_alpha(model, 1.0)                       # annealing weight α (1 = dense, 0 = TopK)
    model.save_pretrained(out)                  # memlens.load_model(out) re-applies TopK

This module is core (docs/architecture.md): :func:`memlens.model.load_model` calls
:func:`apply_topk_from_config` on every model whose config records TopK layers, so the
activation and the config round trip live below everything else; training, reading and
steering TopK models are :mod:`memlens.topk`.

**The activation.** The kept set is chosen with ``torch.topk`` on the pre-activation x and
scattered into a zero tensor, so every position keeps exactly k units even when values tie (a
threshold compare ``x >= τ_k`` would keep all tied units). Gradients reach only the kept units
(at α = 0); ``act.alpha`` = α anneals y = α f(x) + (1 − α) TopK(x) while training (α = 1 is
dense).

**The conversion.** Only the MLP *activation module* (adapter component ``mlp_act``) is
swapped; weights and module paths stay those of the original architecture, so every memlens
hook (``blocks.L.mlp.hook_post`` …) and every HF tool keeps working.

Where the sparsity lands: in GPT-2 / GPT-Neo / GPT-J / NeoX the MLP is
``out(TopK(in(x)))`` and the hidden state feeding the output matrix (``hook_post``) has exactly
k non-zeros. In the Llama family (SwiGLU) the MLP is ``down(act(gate(x)) ⊙ up(x))``: TopK
replaces ``act`` on the gate, so the hidden state ``TopK(gate(x)) ⊙ up(x)`` that feeds
``down_proj`` is non-zero on exactly the k units the gate selected (up to exact zeros of
``up(x)``, which have probability 0). Its kept values may be negative (``up`` is signed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from memlens.arch import adapter_for
from memlens.errors import MemlensError

#: f, the elementwise function applied before masking. The paper uses ReLU.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
}


class TopKError(MemlensError):
    """TopK settings are invalid (k out of range, unknown activation, bad layer set, ...)."""


def check_activation(name: str) -> None:
    """Raise :class:`TopKError` unless ``name`` is a key of :data:`ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise TopKError(f"unknown TopK activation {name!r}; choose one of {sorted(ACTIVATIONS)}")


class TopK(nn.Module):
    """TopK_k activation: keep the k largest units of x per position, apply f to them.

        y = α · f(x) + (1 − α) · f(x) ⊙ 1{x ≥ τ_k(x)}

    τ_k(x) is the k-th largest entry of x along the last (d_ff) axis; ``alpha`` = 0 (default)
    is pure TopK, ``alpha`` = 1 the dense activation f. The module has no parameters, so
    swapping it into a model changes neither the state dict nor the weights files.

        act = TopK(k=2)
        act(torch.tensor([[3.0, -1.0, 2.0, 0.5]]))   # tensor([[3., 0., 2., 0.]])
    """

    def __init__(self, k: int, activation: str = "relu", alpha: float = 0.0):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise TopKError(f"TopK needs a positive integer k, got {k!r}")
        check_activation(activation)
        self.k = k
        self.activation = activation
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"k={self.k}, activation={self.activation!r}, alpha={self.alpha:g}"

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """1{x ≥ τ_k(x)} as a bool tensor shaped like x, with exactly k True per position."""
        indices = self._indices(x)
        return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, indices, True)

    def _indices(self, x: torch.Tensor) -> torch.Tensor:
        d_ff = x.shape[-1]
        if self.k > d_ff:
            raise TopKError(f"TopK k={self.k} exceeds the hidden width d_ff={d_ff}")
        return x.topk(self.k, dim=-1, sorted=False).indices  # (..., k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = ACTIVATIONS[self.activation]
        indices = self._indices(x)  # (..., k)
        kept = f(x.gather(-1, indices))  # f(x) on the kept units only, (..., k)
        sparse = torch.zeros_like(x).scatter(-1, indices, kept)  # f(x) ⊙ 1{x ≥ τ_k(x)}
        if self.alpha == 0.0:
            return sparse
        return self.alpha * f(x) + (1.0 - self.alpha) * sparse


def alpha_at(step: int, total_steps: int, anneal_ratio: float = 0.2) -> float:
    """α at optimizer ``step`` (0-based): linear from 1 at step 0 to 0 at ``anneal_ratio``·total.

        alpha_at(0, 100) == 1.0; alpha_at(10, 100) == 0.5; alpha_at(20, 100) == 0.0
    """
    if not 0.0 <= anneal_ratio <= 1.0:
        raise TopKError(f"anneal_ratio must lie in [0, 1], got {anneal_ratio}")
    anneal_steps = anneal_ratio * total_steps
    if anneal_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / anneal_steps)


# ── converting a model ───────────────────────────────────────────────────────

#: Version of the ``config.topk`` dict layout, for future migrations.
CONFIG_VERSION = 1


@dataclass
class TopKSettings:
    """What ``to_topk`` did; stored as a plain dict in ``model.config.topk``."""

    k: int  # units kept per position in each TopK layer
    layers: list[int] = field(default_factory=list)  # blocks whose MLP activation is TopK
    activation: str = "relu"  # f in y = f(x) ⊙ 1{x ≥ τ_k(x)}
    n_last_nontopk: int = 2  # how many final layers stay dense (informational once resolved)
    anneal_ratio: float = 0.2  # share of training steps over which α goes 1 → 0
    alpha: float = 0.0  # current annealing weight (0 = pure TopK)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TopKSettings:
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise TopKError(f"config.topk has unknown key(s) {sorted(unknown)}; known: "
                            f"{sorted(known)}")
        if "k" not in data:
            raise TopKError("config.topk lacks 'k' (the number of units kept per position)")
        return cls(**{**data, "layers": [int(layer) for layer in data.get("layers", [])]})


def default_layers(n_layers: int, n_last_nontopk: int = 2) -> list[int]:
    """Blocks 0 … n_layers − n_last_nontopk − 1: TopK everywhere but the last few layers."""
    if not 0 <= n_last_nontopk < n_layers:
        raise TopKError(f"n_last_nontopk={n_last_nontopk} must lie in [0, {n_layers - 1}] for a "
                        f"model with {n_layers} layers (at least one layer must be TopK)")
    return list(range(n_layers - n_last_nontopk))


def to_topk(
    model: nn.Module,
    k: int = 64,
    *,
    activation: str = "relu",
    n_last_nontopk: int = 2,
    layers: list[int] | None = None,
    anneal_ratio: float = 0.2,
    alpha: float = 0.0,
) -> TopKSettings:
    """Replace the MLP activation of ``layers`` (default: all but the last ``n_last_nontopk``)
    with :class:`TopK` in place, and record the settings in
    ``model.config.topk`` so that ``save_pretrained`` / :func:`memlens.load_model` round-trip.

        model, tok = memlens.testing.random_model("llama")
        to_topk(model, k=16)                      # layers [0, 1] of the 4-layer model
    """
    adapter = adapter_for(model)
    check_activation(activation)
    chosen = default_layers(adapter.n_layers, n_last_nontopk) if layers is None else layers
    bad = [layer for layer in chosen if not 0 <= layer < adapter.n_layers]
    if bad or not chosen:
        raise TopKError(f"TopK layers {chosen} must be a non-empty subset of 0 … "
                        f"{adapter.n_layers - 1}")
    d_ff = adapter.get_edit_weight(model, 0).shape[1]
    if not isinstance(k, int) or not 1 <= k <= d_ff:
        raise TopKError(f"k={k!r} must be an integer in [1, d_ff={d_ff}]")
    if not 0.0 <= alpha <= 1.0:
        raise TopKError(f"alpha must lie in [0, 1], got {alpha}")
    settings = TopKSettings(k=k, layers=sorted(set(chosen)), activation=activation,
                            n_last_nontopk=adapter.n_layers - 1 - max(chosen),
                            anneal_ratio=anneal_ratio, alpha=alpha)
    _install(model, settings)
    return settings


def apply_topk_from_config(model: nn.Module) -> TopKSettings:
    """Install the TopK activations that ``model.config.topk`` describes (called by load_model).

        model = AutoModelForCausalLM.from_pretrained(saved_topk_dir)
        apply_topk_from_config(model)             # memlens.load_model does this for you
    """
    data = getattr(model.config, "topk", None)
    if not isinstance(data, dict) or not data:
        raise TopKError("model.config.topk is missing or not a dict; was this model converted "
                        "with memlens.topk.to_topk?")
    settings = TopKSettings.from_dict(data)
    check_activation(settings.activation)
    _install(model, settings)
    return settings


def _install(model: nn.Module, settings: TopKSettings) -> None:
    adapter = adapter_for(model)
    for layer in settings.layers:
        path = adapter.module_name(layer, "mlp_act")
        parent_path, _, attr = path.rpartition(".")
        current = model.get_submodule(path)
        if isinstance(current, TopK):
            current.k, current.activation, current.alpha = (settings.k, settings.activation,
                                                            settings.alpha)
        else:
            setattr(model.get_submodule(parent_path), attr,
                    TopK(settings.k, settings.activation, settings.alpha))
    model.config.topk = settings.to_dict()


def topk_modules(model: nn.Module) -> dict[int, TopK]:
    """Layer → TopK module of every converted layer (empty for a dense model)."""
    adapter = adapter_for(model)
    found = {}
    for layer in range(adapter.n_layers):
        module = model.get_submodule(adapter.module_name(layer, "mlp_act"))
        if isinstance(module, TopK):
            found[layer] = module
    return found


def topk_settings(model: nn.Module) -> TopKSettings | None:
    """The settings stored in ``model.config.topk``, or None for a dense model."""
    data = getattr(model.config, "topk", None)
    return TopKSettings.from_dict(data) if data else None


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Set the annealing weight α of every TopK layer (and in ``config.topk``, so it saves)."""
    if not 0.0 <= alpha <= 1.0:
        raise TopKError(f"alpha must lie in [0, 1], got {alpha}")
    modules = topk_modules(model)
    if not modules:
        raise TopKError("the model has no TopK layers; convert it with to_topk first")
    for module in modules.values():
        module.alpha = float(alpha)
    model.config.topk = {**model.config.topk, "alpha": float(alpha)}
