"""The corruption of causal tracing: noise added to the subject tokens' embeddings.

    nu = noise_scale(handle, ["Toulouse", "Miles Davis"])     # ν = 3 × std of subject embeddings
    spec = resolve_noise(handle, 0.3)                         # NoiseSpec(scale=0.3, dist="gaussian")
    eps = draw_noise(spec, samples=10, n_tokens=2, d_model=64, seed=0)   # (10, 2, 64), ν included

Meng et al. (2022, §2) corrupt the subject with Gaussian noise of standard deviation
ν = 3 σ, where σ is the standard deviation of the embeddings of subject tokens over the fact
set. The reference code also offers uniform noise (U(−ν, ν)). The draws come from a
``torch.Generator`` seeded with ``seed`` and are made ONCE per trace: every corrupted run of
the trace (and the naive reference algorithm in :mod:`memlens.trace.reference`) adds the very
same tensor, sample s getting ``eps[s]`` — as the reference code, which re-seeds its generator
for every run, does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from memlens.errors import EmptyInput, MemlensError

if TYPE_CHECKING:
    from memlens.model import ModelHandle

NoiseDist = Literal["gaussian", "uniform"]
#: What ``trace_fact(noise=...)`` accepts: None (ν from the subjects), a float ν, or "uniform".
NoiseArg = float | str | None

NOISE_FACTOR = 3.0  # ν = NOISE_FACTOR × σ(subject-token embeddings), ROME §2


@dataclass(frozen=True)
class NoiseSpec:
    """Noise of a trace: scale ν and distribution (gaussian: N(0, ν²); uniform: U(−ν, ν))."""

    scale: float
    dist: NoiseDist = "gaussian"


def noise_scale(handle: ModelHandle, subjects: Sequence[str], *,
                factor: float = NOISE_FACTOR) -> float:
    """ν = ``factor`` × the standard deviation of the token embeddings of ``subjects``.

    Each subject is tokenized on its own (no special tokens), as the reference code's
    ``collect_embedding_std`` does; σ is taken over every element of every subject token's
    embedding vector.

        nu = noise_scale(handle, [f["subject"] for f in facts])
    """
    subjects = [s for s in subjects if s and s.strip()]
    if not subjects:
        raise EmptyInput("noise_scale needs at least one non-empty subject")
    ids = [i for s in subjects for i in handle.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise EmptyInput(f"the subjects {subjects[:3]!r}... tokenize to nothing")
    embedding = handle.arch.embedding(handle.model)
    with torch.no_grad():
        vectors = embedding(torch.tensor(ids, device=handle.device))  # (n_tokens, d_model)
    # numpy's reduction is sequential: σ, and with it every trace cache key, is then the same
    # bit for bit whatever torch's thread count (torch's parallel std differs in the last digits)
    sigma = float(np.std(vectors.double().cpu().numpy(), ddof=1))
    if not sigma > 0 or sigma != sigma:
        raise MemlensError(f"the subject embeddings have std {sigma}: cannot derive a noise level")
    return factor * sigma


def resolve_noise(handle: ModelHandle, noise: NoiseArg, subjects: Sequence[str] = ()) -> NoiseSpec:
    """Turn the user's ``noise`` argument into a :class:`NoiseSpec`.

    ``None`` → Gaussian with ν = :func:`noise_scale` over ``subjects`` plus, when the model is a
    memlens organism (its directory holds ``known_facts.json``), all of its known facts'
    subjects; a number → Gaussian with that ν; ``"uniform"`` → uniform with the default ν;
    ``"uniform:0.5"`` → uniform with ν = 0.5.
    """
    if isinstance(noise, bool):
        raise MemlensError(f"noise must be a number, 'uniform' or None, not {noise!r}")
    if isinstance(noise, (int, float)):
        if not noise > 0:
            raise MemlensError(f"noise scale must be positive, got {noise}")
        return NoiseSpec(float(noise), "gaussian")
    if noise is None:
        return NoiseSpec(noise_scale(handle, _default_subjects(handle, subjects)), "gaussian")
    if isinstance(noise, str) and noise.startswith("uniform"):
        _, _, value = noise.partition(":")
        if value:
            return NoiseSpec(resolve_noise(handle, float(value)).scale, "uniform")
        return NoiseSpec(resolve_noise(handle, None, subjects).scale, "uniform")
    try:
        return resolve_noise(handle, float(noise))
    except ValueError:
        raise MemlensError(
            f"noise must be a positive number, 'uniform' or 'uniform:X', not {noise!r}"
        ) from None


def _default_subjects(handle: ModelHandle, subjects: Sequence[str]) -> list[str]:
    found = list(subjects)
    if handle.source_dir is not None and (handle.source_dir / "known_facts.json").is_file():
        import json

        facts = json.loads((handle.source_dir / "known_facts.json").read_text())
        found += [f["subject"] for f in facts if f.get("subject")]
    return found


def draw_noise(spec: NoiseSpec, samples: int, n_tokens: int, d_model: int, *, seed: int,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise ν·ε added to the subject embeddings, (samples, n_tokens, d_model).

    Drawn in float64 on the CPU from ``torch.Generator().manual_seed(seed)`` (so the draws do not
    depend on the model's dtype or device), then cast.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (samples, n_tokens, d_model)
    if spec.dist == "gaussian":
        eps = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif spec.dist == "uniform":
        eps = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    else:
        raise MemlensError(f"unknown noise distribution {spec.dist!r} (gaussian, uniform)")
    return (spec.scale * eps).to(dtype=dtype, device=device)
