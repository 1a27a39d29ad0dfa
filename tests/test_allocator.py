"""memlens.allocator: freed blocks go back to the operating system."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memlens.allocator import return_freed_memory

PROBE = """
import sys, torch
from memlens.allocator import return_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "set":
    assert return_freed_memory()
first = torch.ones(1 << 20)
del first  # a 4 MiB block freed: glibc would raise its threshold to 4 MiB
blocks = [torch.ones(1 << 20) for _ in range(100)]  # 100 x 4 MiB, touched
before = rss()
del blocks[::2]  # every other block freed: holes, not the top of the heap
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_return_to_the_os_with_a_fixed_threshold():
    def released(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True,
                             capture_output=True, text=True).stdout
        return int(out.strip().splitlines()[-1])

    assert released("set") > 150 * 2**20  # ~200 MiB freed, ~200 MiB returned
    assert released("default") < 50 * 2**20  # glibc's own rule keeps the holes


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        return_freed_memory(0)


def test_onednn_keeps_no_primitive_cache_unless_the_user_chose(monkeypatch):
    import os

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    return_freed_memory()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    assert os.environ["LRU_CACHE_CAPACITY"] == "1"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    return_freed_memory()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


SHAPES_PROBE = """
import ctypes, sys, torch
from memlens.allocator import return_freed_memory
if sys.argv[1] == "set":
    return_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
weight = torch.randn(1600, 6400).bfloat16()
x = torch.randn(40, 1600).bfloat16()
x @ weight
before = libc.mallinfo2().uordblks
for rows in range(1, 41):  # 40 shapes of one bfloat16 product
    x[:rows] @ weight
print(libc.mallinfo2().uordblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_bfloat16_products_keep_no_state_per_shape():
    import os

    env = {k: v for k, v in os.environ.items()  # as a fresh process: earlier tests set them
           if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}

    def kept(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", SHAPES_PROBE, mode], check=True,
                             capture_output=True, text=True, env=env).stdout
        return int(out.strip().splitlines()[-1])

    assert kept("set") < 4 * 2**20
    if kept("default") < 16 * 2**20:
        pytest.skip("this CPU's bfloat16 products keep no per-shape state even by default")
