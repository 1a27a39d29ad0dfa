"""The TopK activation of Takahashi et al. (2025), with the annealing used while training.

    act = TopK(k=64)                      # y = f(x) ⊙ 1{x ≥ τ_k(x)}, f = ReLU
    y = act(torch.randn(2, 5, 1024))      # exactly k units per position are kept
    act.alpha = 1.0                       # annealing: y = α f(x) + (1 − α) TopK(x); α=1 is dense
    alpha_at(step=50, total_steps=1000, anneal_ratio=0.2)   # 0.75: linear 1 → 0 over 20% of steps

The kept set is chosen with ``torch.topk`` on the pre-activation x and scattered into a zero
tensor, so every position keeps exactly k units even when values tie (a threshold compare
``x >= τ_k`` would keep all tied units). Gradients reach only the kept units (at α = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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
