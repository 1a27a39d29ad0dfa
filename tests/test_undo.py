"""The undo ledger over a long mixed history (issue 17): 100 sequential edits by ROME, MEMIT, FT,
FT-L and sparse memorization updates, undone in reverse order, leave every parameter
bit-identical and the fingerprint as it was; undo out of order is refused where a later edit
changed the same matrices and allowed where it did not."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from memlens.edit import EditHandle, EditRequest, ROMEHyperParams, apply_rome
from memlens.edit.finetune import FTHyperParams, apply_ft, apply_ft_l
from memlens.edit.memit import MEMITHyperParams, apply_memit
from memlens.errors import MemlensError
from memlens.memorization.contrastive import ContrastiveObjective
from memlens.memorization.sparse import gradient_mask, sparse_update
from memlens.stats import layer_stats
from memlens.testing import random_text

N_EDITS = 100
SUBJECTS = ["Toulouse", "Paris", "Tokyo", "Miles Davis", "Steve Jobs", "Danielle Darrieux"]
TARGETS = ["Japan", "France", "the", "trumpet", "Apple", "French"]
TEMPLATES = ["{}", "The city. {}"]
#: Few optimisation steps: the edits need to change weights, not to take.
ROME_HP = ROMEHyperParams(v_num_grad_steps=2, fact_token="last")
MEMIT_HP = MEMITHyperParams(v_num_grad_steps=2, fact_token="last")
FT_HP = FTHyperParams(lr=1e-3, num_steps=1)
P = 4  # prefix tokens of the contrastive objective's paragraphs


pytestmark = pytest.mark.usefixtures("one_thread", "isolated_home")


def _request(rng: random.Random) -> EditRequest:
    return EditRequest("{} is a city in", rng.choice(SUBJECTS), rng.choice(TARGETS))


def _editors(handle: Any, corpus: str) -> list[tuple[str, Callable[[random.Random], EditHandle]]]:
    """(name, rng → applied edit) for every editor, with tiny settings; statistics once."""
    layers = list(range(handle.n_layers))
    stats = layer_stats(handle, layers, corpus=corpus, n_samples=40, max_len=32, progress=False)
    g = torch.Generator().manual_seed(0)
    mp = torch.randint(0, len(handle.tokenizer), (2, 3 * P), generator=g)
    nmp = torch.randint(0, len(handle.tokenizer), (2, 3 * P), generator=g)
    objective = ContrastiveObjective.build(handle.model, mp, nmp, prefix_len=P)
    mask = gradient_mask(handle, objective, fraction=0.01)

    def rome(rng: random.Random) -> EditHandle:
        layer = rng.choice(layers)
        return apply_rome(handle, _request(rng), layer=layer, hparams=ROME_HP, stats=stats,
                          templates=TEMPLATES, check_current=False)

    def memit(rng: random.Random) -> EditHandle:
        start = rng.choice(layers[:-1])
        return apply_memit(handle, [_request(rng), _request(rng)], layers=[start, start + 1],
                           hparams=MEMIT_HP, stats=stats, templates=TEMPLATES,
                           check_current=False, progress=False)

    def ft(rng: random.Random) -> EditHandle:
        return apply_ft(handle, _request(rng), layer=rng.choice(layers), hparams=FT_HP,
                        check_current=False)

    def ft_l(rng: random.Random) -> EditHandle:
        return apply_ft_l(handle, _request(rng), layer=rng.choice(layers), hparams=FT_HP,
                          check_current=False)

    def sparse(rng: random.Random) -> EditHandle:
        return sparse_update(handle, objective, mask, lr=1e-3, steps=1)[0]

    return [("rome", rome), ("memit", memit), ("ft", ft), ("ft-l", ft_l), ("sparse", sparse)]


def _state(handle: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


def _changed(handle: Any, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in handle.model.state_dict().items() if not torch.equal(v, before[k])]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_undo_is_bit_exact_after_100_mixed_edits(model_type, random_model_dirs, tmp_path):
    from memlens.model import load_model

    handle = load_model(str(random_model_dirs[model_type]), device="cpu")
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text(random_text(40, rng=rng))
    editors = _editors(handle, str(corpus))
    original, fingerprint = _state(handle), handle.fingerprint(refresh=True)
    edits: list[EditHandle] = []
    for i in range(N_EDITS - 2):
        name, apply = editors[i % len(editors)]
        before = _state(handle)
        edits.append(apply(rng))
        assert _changed(handle, before), f"edit {i} ({name}) changed no weight"
        assert edits[-1].took is not None or name == "sparse"
    # The last two change one matrix each, in different layers: the first of them commutes.
    for layer in (0, handle.n_layers - 1):
        edits.append(apply_ft(handle, _request(rng), layer=layer, hparams=FT_HP,
                              check_current=False))
    assert len(edits) == N_EDITS and handle.fingerprint() != fingerprint

    # Out of order: an edit whose matrices a later edit changed again is refused, unchanged.
    before = _state(handle)
    last_two = set(edits[-2].originals) | set(edits[-1].originals)
    latest_clash = max(i for i, e in enumerate(edits[:-2]) if set(e.originals) & last_two)
    for clash in (0, latest_clash):
        with pytest.raises(MemlensError, match="undo the later edits first"):
            edits[clash].undo()
        assert not _changed(handle, before) and not edits[clash].undone
    # An edit that no later edit overlaps may be undone first (the ledger checks per matrix).
    edits[-2].undo()
    assert _changed(handle, before) == list(edits[-2].originals)

    for edit in reversed(edits):
        edit.undo()
    assert not _changed(handle, original), "undo did not restore every parameter bit-exact"
    assert handle.fingerprint() == fingerprint
    edits[0].undo()  # undoing twice is a no-op
    assert not _changed(handle, original)
