"""The example notebooks (examples/*.ipynb): each runs top to bottom on the `tiny` organism, its
parameter cell replaced by seconds-scale settings, in a Jupyter kernel of this Python; and every
code cell uses memlens's public API only (no name starting with an underscore, no CLI call).

`make notebooks` (examples/run_notebooks.py) re-executes them on the default organism and
stores their outputs; these tests never write into examples/.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import time
from pathlib import Path

import nbformat  # the dev extra: nbformat, nbclient, ipykernel
import pytest


def _load_runner():
    """examples/run_notebooks.py (a script, not a package module)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "run_notebooks.py"
    spec = importlib.util.spec_from_file_location("memlens_run_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
DEFAULT_MODEL, EXAMPLES = runner.DEFAULT_MODEL, runner.EXAMPLES
execute, parameter_cell = runner.execute, runner.parameter_cell

NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))

#: The parameter cell each notebook runs with in the tests: `tiny`, seconds-scale knobs.
TINY = {
    "01_causal_tracing.ipynb": {"MODEL": "organism:tiny", "SAMPLES": 3, "N_FACTS": 4},
    "02_rome.ipynb": {"MODEL": "organism:tiny", "N_CASES": 2, "GENERATE": False,
                      "GEN_TOKENS": 8},
    "03_memit.ipynb": {"MODEL": "organism:tiny", "N_EDITS": 4, "SIZES": (1, 2),
                       "GE_CASES": 1},
    "04_memorization.ipynb": {"MODEL": "organism:tiny", "N_PARAGRAPHS": None,
                              "MAX_PARAGRAPHS": 2, "LR": 0.1, "STEPS": 3},
    "05_topk.ipynb": {"MODEL": "organism:tiny", "STEPS": 20, "N_BLOCKS": 16, "N_NEURONS": 1,
                      "GEN_TOKENS": 8},
}


def test_every_notebook_has_tiny_settings():
    assert NOTEBOOKS == sorted(TINY), "add the new notebook's tiny settings to TINY"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameter_cell(name):
    """One cell tagged `parameters`, with the default organism and exactly the knobs the test
    overrides (so the committed notebook is never the tiny variant)."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    cell = parameter_cell(nb)
    names = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign), f"{name}: the parameter cell holds assignments only"
        for target in node.targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name):
                    names[leaf.id] = node.value
    assert ast.literal_eval(names["MODEL"]) == DEFAULT_MODEL
    assert set(names) == set(TINY[name]), f"{name}: parameters {sorted(names)}"


def _code(nb) -> list[tuple[int, ast.Module]]:
    """(index, AST) of every code cell, IPython magics turned into Python first."""
    from IPython.core.inputtransformer2 import TransformerManager

    transform = TransformerManager().transform_cell
    return [(i, ast.parse(transform(cell.source))) for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code"]


SHELL = ("system", "sx", "sh", "bash", "script", "perl", "ruby")  # magics that run a shell


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def public_api_problems(nb) -> list[str]:
    """Imports of a name or module component starting with an underscore, private attributes,
    and shell or subprocess calls (the CLI) in the code cells of ``nb``."""
    problems = []
    for i, tree in _code(nb):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        problems.append(f"cell {i}: import {alias.name}")
                    if alias.name.split(".")[0] in ("subprocess", "pty"):
                        problems.append(f"cell {i}: import {alias.name} (no CLI calls)")
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level or any(part.startswith("_") for part in module.split(".")):
                    problems.append(f"cell {i}: from {'.' * node.level}{module} import ...")
                if module.split(".")[0] in ("subprocess", "pty"):
                    problems.append(f"cell {i}: from {module} import ... (no CLI calls)")
                for alias in node.names:
                    if alias.name.startswith("_"):
                        problems.append(f"cell {i}: from {module} import {alias.name}")
            elif isinstance(node, ast.Attribute):
                if _private(node.attr):
                    problems.append(f"cell {i}: private attribute .{node.attr}")
                if node.attr in ("system", "getoutput", "popen", "spawnl", "execv") and not (
                        isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")):
                    problems.append(f"cell {i}: .{node.attr}(...) runs a shell command")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("run_line_magic", "run_cell_magic") and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in SHELL:
                problems.append(f"cell {i}: %{node.args[0].value} runs a shell command")
    return problems


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_public_api_only(name):
    assert public_api_problems(nbformat.read(EXAMPLES / name, as_version=4)) == []


def test_public_api_checker_finds_violations():
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in (
        "from memlens.trace.fast import _batched",
        "import memlens._private",
        "from memlens.studies.scaling import _quality as quality",
        "handle._cache",
        "!memlens trace --model organism:tiny",
        "import subprocess; subprocess.run(['memlens', 'demo'])",
        "%%bash\nmemlens demo",
    )])
    found = public_api_problems(bad)
    for i in range(7):
        assert any(p.startswith(f"cell {i}:") for p in found), (i, found)
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "%matplotlib inline\nimport memlens\nprint(memlens.__version__)")])
    assert public_api_problems(good) == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_are_from_a_clean_default_run(name):
    """What `make notebooks` stored: no error, nothing from the `tiny` organism the tests use
    (a notebook saved after a test-sized run would show it)."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for o in outputs)
    assert "organism:tiny" not in text and "/tiny-" not in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_tiny(name, tiny_organism, tmp_path):
    """Executes every cell in a fresh kernel (cwd: a temporary directory; the environment of
    the tests, so the kernel finds the same MEMLENS_HOME and `tiny`); any error fails."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    start = time.perf_counter()
    execute(nb, TINY[name], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=900)
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
    assert images >= 1, f"{name}: no inline figure"
    print(f"{name}: {seconds:.1f} s on tiny, {images} figures")
