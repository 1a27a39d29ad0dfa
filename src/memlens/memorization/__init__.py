"""Paragraph memorization (Stoehr et al. 2024): find it, localize it, unlearn and edit it.

    from memlens.memorization import load_paragraphs, scan, perturb, attribute, head_analysis
    paragraphs = load_paragraphs(handle)                      # organism paragraphs by default
    result = scan(handle, paragraphs)                         # EM / NLL, MP vs NMP
    mp, nmp = result.split(paragraphs)
    perturbed = perturb(handle, mp)                           # token swaps → PMP
    grads = attribute(handle, paragraph_tensor(mp), paragraph_tensor(nmp))
    heads = head_analysis(handle, paragraph_tensor(mp))       # candidate memorization head
    update = run_update(handle, paragraph_tensor(mp), paragraph_tensor(nmp), lr=1e-3, steps=10)
    update.edit.undo()                                        # bit-exact

Modules: data (paragraphs), scan (EM / NLL), perturb (token swaps), attribute (gradients per
head / matrix), contrastive (the CO), sparse (masks, sparse update, undo), heads (attention vs
token frequency), plots. The CLI's steps, each writing its JSON and figures, are the study
:mod:`memlens.studies.memorization`.
"""

from memlens.memorization.attribute import AttributionResult, attribute, weight_slots
from memlens.memorization.contrastive import ContrastiveObjective
from memlens.memorization.data import (
    CorpusNotFound,
    Paragraph,
    ParagraphTooShort,
    load_paragraphs,
    paragraph_tensor,
)
from memlens.memorization.heads import HeadsResult, head_analysis, kendall_tau, kq_scores
from memlens.memorization.perturb import PerturbResult, perturb
from memlens.memorization.scan import (
    ScanResult,
    evaluate,
    exact_match_length,
    greedy_continuation,
    scan,
    suffix_nll,
)
from memlens.memorization.sparse import (
    SparseMask,
    UpdateResult,
    compare_methods,
    gradient_mask,
    run_update,
    save_model,
    sparse_update,
)

__all__ = [
    "AttributionResult", "ContrastiveObjective", "CorpusNotFound", "HeadsResult", "Paragraph",
    "ParagraphTooShort", "PerturbResult", "ScanResult", "SparseMask", "UpdateResult",
    "attribute", "compare_methods", "evaluate", "exact_match_length",
    "gradient_mask", "greedy_continuation", "head_analysis", "kendall_tau", "kq_scores",
    "load_paragraphs", "paragraph_tensor", "perturb", "run_update", "save_model", "scan",
    "sparse_update", "suffix_nll", "weight_slots",
]
