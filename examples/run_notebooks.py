"""Re-execute the example notebooks on the default organism and store their outputs in place.

    python examples/run_notebooks.py                      # all of them (`make notebooks`)
    python examples/run_notebooks.py 02_rome.ipynb        # some of them

Each notebook runs top to bottom in a fresh Jupyter kernel of this Python, in a temporary
working directory, with the settings of its parameter cell (the cell tagged ``parameters``:
``MODEL = "organism:facts-gpt2"`` and its size knobs). A notebook that raises is not saved and
the script exits non-zero. ``tests/test_notebooks.py`` runs the same notebooks on
``organism:tiny`` through :func:`execute`, with the parameter cell replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_MODEL = "organism:facts-gpt2"
KERNEL = "python3"  # jupyter_client starts it with this interpreter (sys.executable)


def parameter_cell(nb: Any) -> Any:
    """The one code cell tagged ``parameters``."""
    cells = [c for c in nb.cells if c.cell_type == "code"
             and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{len(cells)} cells are tagged 'parameters' (one is needed)")
    return cells[0]


def execute(nb: Any, parameters: dict[str, Any] | None = None, *, cwd: str | Path,
            env: dict[str, str] | None = None, timeout: int = 3600) -> Any:
    """Run every cell of ``nb`` in place (outputs stored in it) in a new kernel working in
    ``cwd``; with ``parameters``, the parameter cell is replaced by ``NAME = repr(value)``
    lines first. Raises ``nbclient.exceptions.CellExecutionError`` on the first error."""
    if parameters is not None:
        parameter_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=dict(env if env is not None else os.environ))
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="file names in examples/ (default: all)")
    args = parser.parse_args(argv)
    names = args.notebooks or sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
    failed = []
    for name in names:
        path = EXAMPLES / Path(name).name
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        print(f"{path.name}: running on {DEFAULT_MODEL} ...", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="memlens-notebook-") as cwd:
                execute(nb, cwd=cwd)
        except Exception as exc:  # noqa: BLE001 - report every notebook, then fail
            print(f"{path.name}: FAILED, not saved\n{exc}", file=sys.stderr)
            failed.append(path.name)
            continue
        nbformat.write(nb, path)
        print(f"{path.name}: saved ({time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
