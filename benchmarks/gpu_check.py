"""Multi-GPU check of --device-map: a causal trace and a ROME edit on a model spread over all GPUs.

    python -m benchmarks.gpu_check          # prints OK, or "skipped" (exit 0) without CUDA
    python -m benchmarks.gpu_check --cpu    # the same checks with "cpu" standing in for the GPUs

A tiny random GPT-2 (8 layers) is loaded three ways: whole on the first device (the
reference), with ``device_map="auto"``, and with an explicit map that spreads the blocks over
every GPU and offloads one block to "cpu" (its weights live in CPU memory, it runs on a GPU)
and one to "disk". On each, a causal trace of one fact and ROME edits of the "cpu"-offloaded
layer, the "disk"-offloaded one and one on the last GPU must match the reference (GPU
kernels may order sums differently: tolerance 1e-4), change what the model predicts from,
and undo bit-exactly.
Not part of ``make test`` or ``make bench``: run it by hand on a GPU machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ATOL = 1e-4
N_LAYERS = 8
TEMPLATES = ["{}", "The capital is located. {}"]
PROMPT, SUBJECT = "Toulouse is a city in", "Toulouse"


def split_map(devices: list[str | int]) -> dict[str, str | int]:
    """Blocks in contiguous groups over ``devices``; block 2 offloaded to "cpu", 3 to "disk"
    (with one device, "cpu" is the device itself: resident)."""
    first, last = devices[0], devices[-1]
    groups = {f"transformer.h.{i}": devices[i * len(devices) // N_LAYERS]
              for i in range(N_LAYERS)}
    return {"transformer.wte": first, "transformer.wpe": first, **groups,
            "transformer.h.2": "cpu", "transformer.h.3": "disk",
            "transformer.ln_f": last, "lm_head": first}  # lm_head is tied to wte


def check(handle, reference, stats, layers: list[int], label: str) -> None:
    from memlens.edit import EditRequest, ROMEHyperParams
    from memlens.edit.rome import apply_rome
    from memlens.offload import offloaded, read_tensor
    from memlens.trace import trace_fact

    traces = [trace_fact(h, PROMPT, SUBJECT, kinds=("mlp",), samples=3, seed=0)
              for h in (reference, handle)]
    gap = float(abs(traces[0].scores["mlp"] - traces[1].scores["mlp"]).max())
    assert gap <= ATOL, f"{label}: trace differs by {gap}"
    request = EditRequest("{} is a city in", SUBJECT, "Japan")
    for layer in layers:
        name = f"transformer.h.{layer}.mlp.c_proj.weight"
        hp = ROMEHyperParams.for_model(handle, v_num_grad_steps=5)
        with apply_rome(reference, request, layer=layer, hparams=hp, stats=stats,
                        templates=TEMPLATES, check_current=False):
            want = read_tensor(reference.model, name).cpu()
        before, logits = read_tensor(handle.model, name), handle.logits([PROMPT])
        edit = apply_rome(handle, request, layer=layer, hparams=hp, stats=stats,
                          templates=TEMPLATES, check_current=False)
        got = read_tensor(handle.model, name).cpu()
        assert torch.allclose(got, want, atol=ATOL), \
            f"{label}: ROME of layer {layer} differs by {float((got - want).abs().max())}"
        assert not torch.equal(handle.logits([PROMPT]), logits), \
            f"{label}: the edit of layer {layer} did not reach the forward pass"
        edit.undo()
        assert torch.equal(read_tensor(handle.model, name), before), f"{label}: undo not exact"
        where = "offloaded" if offloaded(handle.model, name) else "resident"
        print(f"  {label}: trace ok (max gap {gap:.1e}); ROME layer {layer} ({where}) ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a dry run)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: skipped (no CUDA device; --cpu runs the same checks on the CPU)")
        return 0
    from memlens.model import load_model
    from memlens.stats import layer_stats
    from memlens.testing import random_model_dir, random_text

    devices: list[str | int] = ["cpu"] if args.cpu else list(range(torch.cuda.device_count()))
    with tempfile.TemporaryDirectory() as tmp:
        ref = str(random_model_dir("gpt2", Path(tmp), n_layer=N_LAYERS))
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(random_text(60))
        first = "cpu" if args.cpu else "cuda:0"
        reference = load_model(ref, device=first)
        stats = layer_stats(reference, [2, 3, N_LAYERS - 2], corpus=str(corpus), n_samples=60,
                            progress=False, cache=False)
        auto = load_model(ref, device_map="auto")
        print(f"device_map=auto: {getattr(auto.model, 'hf_device_map', {'': first})}")
        check(auto, reference, stats, [N_LAYERS - 2], "auto")
        del auto
        split = load_model(ref, device_map=split_map(devices), offload_folder=Path(tmp) / "off")
        print(f"split map: {split.model.hf_device_map}")
        check(split, reference, stats, [2, 3, N_LAYERS - 2], f"split over {len(devices)} device(s)")
    print("gpu_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
