"""Shared fixtures: tiny random models of every architecture, and the `tiny` organism."""

from __future__ import annotations

import os

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
    """Path of headless Chromium. Tests never install system packages: `.ci/run` installs
    Debian's `chromium` and sets MEMLENS_REQUIRE_CHROMIUM=1, which turns the skip into a
    failure."""
    from memlens.report.browser import find_chromium

    path = find_chromium()
    if path is None:
        reason = ("Chromium is not installed (install Debian's `chromium` package, as .ci/run "
                  "does, to render the report in a browser)")
        if os.environ.get("MEMLENS_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason + "; MEMLENS_REQUIRE_CHROMIUM=1 requires it")
        pytest.skip(reason)
    return path
