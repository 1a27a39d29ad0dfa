"""The memorization study (Stoehr et al. 2024): each step of ``memlens memorization`` in one
call that runs the methods of :mod:`memlens.memorization` and writes its JSON and figure.

    paragraphs = load_paragraphs(handle)
    scan_result = run_scan(handle, paragraphs, out)                 # scan.json, scan.png
    summary = run_all(handle, out)                                  # everything + summary.json

The steps share the scan's MP / NMP split; each step rescans when not given one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from memlens.errors import EmptyInput
from memlens.files import read_text
from memlens.memorization import plots
from memlens.memorization.attribute import AttributionResult, attribute
from memlens.memorization.data import PREFIX_LEN, Paragraph, paragraph_tensor
from memlens.memorization.heads import HeadsResult, head_analysis, kq_scores
from memlens.memorization.perturb import PerturbResult, perturb
from memlens.memorization.scan import NMP_MAX_EM, ScanResult, scan
from memlens.memorization.sparse import (
    FRACTION,
    LR,
    STEPS,
    WEIGHT_DECAY,
    UpdateResult,
    compare_methods,
)


@dataclass
class Settings:
    """Options shared by the pipeline steps (CLI flags map one to one)."""

    prefix_len: int = PREFIX_LEN
    mp_min_em: int | None = None  # default: the whole suffix
    nmp_max_em: int = NMP_MAX_EM
    batch_size: int = 32
    max_mp: int = 32  # memorized paragraphs used by perturb / attribute / heads / updates
    max_nmp: int = 32  # non-memorized paragraphs used likewise
    perturb_mode: Literal["model", "random"] = "model"
    fraction: float = FRACTION
    lr: float = LR
    steps: int = STEPS
    weight_decay: float = WEIGHT_DECAY
    seed: int = 0
    progress: bool = True


def _write(out: Path, name: str, data: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def run_scan(handle, paragraphs: list[Paragraph], out: Path, s: Settings) -> ScanResult:
    """Scan, then write ``scan.json`` and ``scan.png``."""
    result = scan(handle, paragraphs, prefix_len=s.prefix_len, mp_min_em=s.mp_min_em,
                  nmp_max_em=s.nmp_max_em, batch_size=s.batch_size, progress=s.progress)
    result.save(out / "scan.json")
    plots.plot_scan(result, out / "scan.png")
    return result


def _split(handle, paragraphs, out, s: Settings, scan_result: ScanResult | None,
           need_nmp: bool = True) -> tuple[list[Paragraph], list[Paragraph]]:
    scan_result = scan_result or run_scan(handle, paragraphs, out, s)
    mp, nmp = scan_result.split(paragraphs)
    if not mp:
        raise EmptyInput(f"no memorized paragraph (EM ≥ {scan_result.mp_min_em}) among "
                         f"{len(paragraphs)}: nothing to localize (lower --mp-min-em?)")
    if need_nmp and not nmp:
        raise EmptyInput(f"no non-memorized paragraph (EM ≤ {scan_result.nmp_max_em}) among "
                         f"{len(paragraphs)} (raise --nmp-max-em?)")
    return mp[: s.max_mp], nmp[: s.max_nmp]


def run_perturb(handle, paragraphs, out: Path, s: Settings,
                scan_result: ScanResult | None = None) -> PerturbResult:
    """Perturb the memorized paragraphs; ``perturb.json``, ``perturb.png``, ``pmp.jsonl``."""
    mp, _ = _split(handle, paragraphs, out, s, scan_result, need_nmp=False)
    result = perturb(handle, mp, prefix_len=s.prefix_len, mode=s.perturb_mode,
                     batch_size=max(s.batch_size, 64), seed=s.seed, progress=s.progress)
    _write(out, "perturb.json", result.to_dict())
    with open(out / "pmp.jsonl", "w") as f:
        rows = zip(result.ids, result.pmp_ids.tolist(), result.pmp_position, strict=True)
        for pid, ids, pos in rows:
            f.write(json.dumps({"id": pid, "position": pos, "token_ids": ids,
                                "text": handle.tokenizer.decode(ids)}) + "\n")
    plots.plot_perturb(result, out / "perturb.png")
    return result


def run_attribute(handle, paragraphs, out: Path, s: Settings,
                  scan_result: ScanResult | None = None) -> AttributionResult:
    """Gradient attribution MP vs NMP (+ CO); ``attribution.json``, ``attribution.png``."""
    mp, nmp = _split(handle, paragraphs, out, s, scan_result)
    result = attribute(handle, paragraph_tensor(mp), paragraph_tensor(nmp),
                       prefix_len=s.prefix_len)
    _write(out, "attribution.json", result.to_dict())
    plots.plot_attribution(result, out / "attribution.png")
    return result


def run_heads(handle, paragraphs, out: Path, s: Settings, scan_result: ScanResult | None = None,
              corpus_texts: list[str] | None = None) -> HeadsResult:
    """Attention vs token frequency per head on MP; ``heads.json``, ``heads.png``, ``kq.png``."""
    from memlens.memorization.heads import corpus_frequencies, token_frequencies

    mp, _ = _split(handle, paragraphs, out, s, scan_result, need_nmp=False)
    if corpus_texts is None and handle.source_dir and (handle.source_dir / "corpus.txt").is_file():
        freqs = corpus_frequencies(handle)
        source = "corpus.txt"
    elif corpus_texts is not None:
        freqs = corpus_frequencies(handle, corpus_texts)
        source = "given texts"
    else:
        freqs = token_frequencies((p.token_ids for p in paragraphs),
                                  int(handle.model.config.vocab_size))
        source = "the paragraphs themselves (no corpus.txt)"
    ids = paragraph_tensor(mp)
    result = head_analysis(handle, ids, prefix_len=s.prefix_len, frequencies=freqs)
    layer, head = result.candidate
    scores = kq_scores(handle, ids[0], layer, head)
    tokens = [repr(handle.tokenizer.decode([t]))[1:-1] for t in ids[0].tolist()]
    _write(out, "heads.json", {**result.to_dict(), "frequency_source": source,
                               "kq_paragraph": mp[0].id})
    plots.plot_heads(result, out / "heads.png")
    plots.plot_kq(scores, tokens, out / "kq.png",
                  title=f"KQ scores of layer {layer} head {head}, paragraph {mp[0].id}")
    return result


def heldout_blocks(handle, length: int, n: int = 64) -> torch.Tensor | None:
    """Up to ``n`` blocks of ``length`` tokens from the model directory's corpus.txt."""
    path = handle.source_dir / "corpus.txt" if handle.source_dir else None
    if path is None or not path.is_file():
        return None
    text = read_text(path, "corpus")[-400_000:]
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][-n:]
    return torch.tensor(blocks, dtype=torch.long) if blocks else None


def run_updates(handle, paragraphs, out: Path, s: Settings, *,
                mode: Literal["unlearn", "edit"] = "unlearn",
                methods: tuple[str, ...] = ("sparse", "random", "full"),
                scan_result: ScanResult | None = None,
                perturb_result: PerturbResult | None = None,
                keep: str | None = None) -> list[UpdateResult]:
    """Unlearn (or edit towards the PMP) with each method; ``{mode}.json``, ``{mode}.png``.

    Every method starts from the original weights; the method named ``keep`` stays applied
    (its :class:`~memlens.ledger.EditHandle` is in the result), the rest are undone.
    """
    mp, nmp = _split(handle, paragraphs, out, s, scan_result)
    mp_ids, nmp_ids = paragraph_tensor(mp), paragraph_tensor(nmp)
    pmp_ids = None
    if mode == "edit":
        if perturb_result is None or perturb_result.ids != [p.id for p in mp]:
            perturb_result = run_perturb(handle, paragraphs, out, s, scan_result)
        pmp_ids = perturb_result.pmp_ids
    results = compare_methods(
        handle, mp_ids, nmp_ids, methods=methods, keep=keep, mode=mode, pmp_ids=pmp_ids,
        prefix_len=s.prefix_len, fraction=s.fraction, lr=s.lr, steps=s.steps,
        weight_decay=s.weight_decay, heldout=heldout_blocks(handle, mp_ids.shape[1]),
        seed=s.seed)
    _write(out, f"{mode}.json", {"n_mp": len(mp), "n_nmp": len(nmp),
                                 "results": [r.to_dict(handle) for r in results]})
    plots.plot_updates(results, out / f"{mode}.png")
    return results


def run_all(handle, paragraphs: list[Paragraph], out: Path, s: Settings) -> dict[str, Any]:
    """Scan, perturb, attribute, heads, unlearn and edit (sparse / random / full), all undone
    at the end; writes every step's files and ``summary.json``.

    Example::

        summary = run_all(handle, load_paragraphs(handle), Path("out"), Settings(lr=1e-3))
    """
    scan_result = run_scan(handle, paragraphs, out, s)
    summary: dict[str, Any] = {
        "model": handle.ref, "settings": vars(s) | {"progress": None},
        "scan": {k: v for k, v in scan_result.to_dict().items() if k != "rows"},
    }
    perturbed = run_perturb(handle, paragraphs, out, s, scan_result)
    summary["perturb"] = {
        "mode": perturbed.mode,
        "mean_em_drop_by_position": perturbed.em_drop.float().mean(0).tolist(),
        "pmp_position": perturbed.pmp_position,
        "pmp_base_em_drop": [int(perturbed.em_drop[i].max()) for i in range(len(perturbed.ids))],
    }
    att = run_attribute(handle, paragraphs, out, s, scan_result)
    diff = att.mp.values - att.nmp.values
    top = int(diff.flatten().argmax())
    summary["attribute"] = {
        "layer_share_mp": (att.mp.layer_sum / att.mp.layer_sum.sum()).tolist(),
        "layer_share_nmp": (att.nmp.layer_sum / att.nmp.layer_sum.sum()).tolist(),
        "largest_mp_minus_nmp": {"layer": top // diff.shape[1],
                                 "component": att.columns[top % diff.shape[1]]},
    }
    heads = run_heads(handle, paragraphs, out, s, scan_result)
    summary["heads"] = {k: v for k, v in heads.to_dict().items() if k not in ("tau", "rare_mass")}
    for mode in ("unlearn", "edit"):
        results = run_updates(handle, paragraphs, out, s, mode=mode, scan_result=scan_result,
                              perturb_result=perturbed)
        summary[mode] = {r.method: {"before": r.before, "after": r.after,
                                    "n_weights": r.mask.n_selected} for r in results}
    _write(out, "summary.json", summary)
    return summary
