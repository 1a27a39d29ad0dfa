"""Give freed tensor memory back to the operating system at once (glibc, CPU), and keep no
per-shape oneDNN state.

glibc's ``malloc`` serves a large block from ``mmap`` only until a block of that size is
freed; then it raises its threshold (up to 32 MiB) and serves later blocks of up to that size
from the heap, which keeps freed blocks instead of returning them. A causal trace or a MEMIT
run of a billion-parameter model allocates and frees thousands of such blocks (activations,
KV caches, weight-sized temporaries), and the process's resident memory stays far above what
is alive (with this call, which the trace stage of ``benchmarks/bench_scale.py`` is the first
to run under, bfloat16 GPT-2 XL's trace peaked at 3.86 instead of 4.87 GiB). A fixed threshold turns
that adjustment off: blocks of ``threshold`` bytes or more are always mapped, and unmapped when
freed.

    from memlens.allocator import return_freed_memory
    return_freed_memory()          # the memlens command line does this before each command

Nothing changes on other C libraries (macOS, musl) or when glibc is not found: the call returns
False. The call also sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` and ``LRU_CACHE_CAPACITY=1``
unless they are set: oneDNN, which runs CPU bfloat16 matrix products, and PyTorch's ideep layer
above it keep state for each matrix shape they have seen (ideep ~1 MB per shape for a GPT-2 XL
width, 1,024 shapes by default), and a trace or an edit meets thousands of shapes: bfloat16
GPT-2 XL's heap kept 0.28 GiB after one causal trace with ideep's default, nothing with 1
(no slower in a one-off timing of 12-layer traces). They take effect only before the process's
first oneDNN product. tests/test_allocator.py checks that freed blocks return to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: tensors of ≥ 262,144 float32 values


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (see the module
    docstring); True if it was set."""
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold}")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "1")  # ideep; 0 is not accepted
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
