"""Shared fixtures: tiny random models of every architecture, a random-word corpus, a private
MEMLENS_HOME, one torch thread, and the `tiny` organism."""

from __future__ import annotations

import functools
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


@pytest.fixture(scope="module")
def gpt2(random_model_dirs):
    """The tiny random GPT-2 loaded on CPU (one per test module)."""
    from memlens.model import load_model

    return load_model(str(random_model_dirs["gpt2"]), device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus file of 200 lines of 30 random words (enough for key statistics)."""
    from memlens.testing import random_text

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(random_text(200))
    return path


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A fresh MEMLENS_HOME per test (statistics, context templates and traces start empty).
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("isolated_home")``."""
    monkeypatch.setenv("MEMLENS_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared (restored after). A
    module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _sharp(model_type: str, implementation: str | None = None):
    from memlens.arch import adapter_for
    from memlens.model import ModelHandle
    from memlens.testing import random_model

    model, tokenizer = random_model(model_type, seed=3, initializer_range=0.2)
    if implementation is not None and model_type != "gpt_neo":
        model.set_attn_implementation(implementation)
    model = model.double()
    return ModelHandle(model, tokenizer, adapter_for(model), ref=f"sharp-{model_type}")


@pytest.fixture(scope="session")
def sharp():
    """``sharp(model_type, implementation=None)``: a tiny float64 model with large random
    weights (so that attention matters, and restorations move P(answer) far more than a 1e-5
    tolerance), with the given attention implementation (None: the default; GPT-Neo has eager
    only). One handle per arguments, shared by the tests."""
    return _sharp


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
