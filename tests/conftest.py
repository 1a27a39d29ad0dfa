"""Shared fixtures: tiny random models of every architecture, and the `tiny` organism."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from memlens.testing import TINY_CONFIGS  # noqa: E402

ARCHITECTURES = sorted(TINY_CONFIGS)


@pytest.fixture(scope="session")
def random_model_dirs(tmp_path_factory):
    """model_type → directory of a saved tiny random model (built once per run)."""
    from memlens.testing import random_model_dir

    root = tmp_path_factory.mktemp("random-models")
    return {model_type: random_model_dir(model_type, root) for model_type in ARCHITECTURES}


@pytest.fixture(scope="session", params=ARCHITECTURES)
def random_handle(request, random_model_dirs):
    """A ModelHandle of each supported architecture (parametrised)."""
    from memlens.model import load_model

    return load_model(str(random_model_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def tiny_organism():
    """Directory of the `tiny` organism, built once (cached under MEMLENS_HOME across runs)."""
    from memlens.organisms.registry import ensure

    return ensure("tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_handle(tiny_organism):
    """The `tiny` organism loaded on CPU (shared; tests that edit it must undo their edits)."""
    from memlens.model import load_model

    return load_model(str(tiny_organism), device="cpu")


@pytest.fixture(scope="session")
def chromium():
    """Path of headless Chromium, installing Debian's package when absent and we are root (CI)."""
    from memlens.report.browser import find_chromium

    if find_chromium() is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True,
                       capture_output=True, timeout=900, check=False)
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed and could not be installed (needs root and apt)")
    return path
