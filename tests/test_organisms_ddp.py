"""A 2-process torchrun (gloo) run reaches the same losses as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "memlens.organisms.ddp_check", str(one)],
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "memlens.organisms.ddp_check", str(two)],
                   check=True, env=env, timeout=300)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    la = [loss for _, loss in a["history"]]
    lb = [loss for _, loss in b["history"]]
    assert len(la) == len(lb) == 6
    assert la[-1] < la[0]  # it learns
    for x, y in zip(la, lb, strict=True):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (la, lb)
    assert abs(a["checksum"] - b["checksum"]) <= 1e-3 * max(1.0, abs(a["checksum"]))
