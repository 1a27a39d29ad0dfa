"""The import contract of docs/architecture.md: memlens is a strict stack of layers.

Every module of ``src/memlens`` belongs to one layer (``LAYERS``, lowest first, by longest
matching module prefix) and may import only from its own layer and the layers below it; the
units of a layer (its top-level modules and packages) and all modules together import each
other without a circle. Every import counts: at module level, inside functions (lazy imports),
under ``TYPE_CHECKING``, and a string naming a memlens module (``importlib`` and ``_LAZY``
tables). The one exception (``EXCEPTIONS``) may occur once, inside a function.

    problems = check(SRC)        # [] when the tree keeps the contract
    python -m pytest -q tests/test_architecture.py      # what `make lint` and `make test` run
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "memlens"

#: Lowest layer first. A module belongs to the layer of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("memlens", "memlens.errors", "memlens.cache", "memlens.files", "memlens.missing",
              "memlens.allocator", "memlens.arch", "memlens.offload", "memlens.hooks", "memlens.tokens", "memlens.model",
              "memlens.ledger", "memlens.scoring", "memlens.gram", "memlens.stats", "memlens.stats_io",
              "memlens.topk_mlp",
              "memlens.trainer", "memlens.figures", "memlens.testing")),
    ("methods", ("memlens.trace", "memlens.edit", "memlens.evaluate", "memlens.memorization",
                 "memlens.topk", "memlens.probe", "memlens.knockout", "memlens.lens")),
    ("organisms", ("memlens.organisms",)),
    ("studies", ("memlens.studies",)),
    ("report", ("memlens.report",)),
    ("cli", ("memlens.cli",)),
]

#: (importer, imported): allowed although it points upward, at most once, inside a function.
#: ``load_model("organism:NAME")`` resolves the name through the organisms layer, which may
#: build (train) the organism first.
EXCEPTIONS = {("memlens.model", "memlens.organisms.registry")}


@dataclass(frozen=True)
class Import:
    """One import of ``target`` by ``source`` at ``line`` (``lazy``: inside a function)."""

    source: str
    target: str
    line: int
    lazy: bool


def module_name(root: Path, path: Path) -> str:
    """``memlens.edit.rome`` for ``root/edit/rome.py``; a package is named by its __init__."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the tree at ``root`` (a ``memlens`` directory), by name."""
    return {module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def _resolve(known: set[str], base: str, names: list[str]) -> Iterator[str]:
    """What ``from base import names`` imports: submodules where they exist, else ``base``."""
    for name in names:
        yield f"{base}.{name}" if f"{base}.{name}" in known else base


def imports(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every memlens module that module ``name`` (at ``path``) imports, wherever it does."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = list(_resolve(known, base, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and "." in node.value and node.value in known:
            targets = [node.value]  # importlib.import_module("memlens.x"), _LAZY tables
        for target in targets:
            if target == "memlens" or target.startswith("memlens."):
                found.append(Import(name, target, getattr(node, "lineno", 0), lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the unit is its longest listed prefix (the package
    ``memlens`` itself is listed for its ``__init__`` only, not as everything's prefix)."""
    best: tuple[int, str] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or ("." in prefix and name.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise KeyError(f"module {name} is in no layer of the contract; add it to LAYERS")
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def check(root: Path) -> list[str]:
    """Every breach of the contract in the tree at ``root``, one line each ([] if none)."""
    known = modules(root)
    problems: list[str] = []
    module_edges: dict[str, set[str]] = {}
    unit_edges: dict[str, set[str]] = {}
    exceptions_used: dict[tuple[str, str], list[Import]] = {}
    for name, path in known.items():
        try:
            layer, unit = layer_of(name)
        except KeyError as exc:
            problems.append(str(exc.args[0]))
            continue
        for imp in imports(name, path, set(known)):
            try:
                target_layer, target_unit = layer_of(imp.target)
            except KeyError:
                continue  # reported as a module of its own
            where = f"{path.relative_to(root.parent)}:{imp.line}"
            if (name, imp.target) in EXCEPTIONS:
                exceptions_used.setdefault((name, imp.target), []).append(imp)
                continue
            if target_layer > layer:
                problems.append(f"{where}: {LAYERS[layer][0]} module {name} imports "
                                f"{imp.target} of the higher layer {LAYERS[target_layer][0]}")
            if imp.target != name:
                module_edges.setdefault(name, set()).add(imp.target)
            if target_unit != unit:
                unit_edges.setdefault(unit, set()).add(target_unit)
    for (source, target), uses in exceptions_used.items():
        if len(uses) > 1 or any(not use.lazy for use in uses):
            problems.append(f"the exception {source} → {target} must be one import inside a "
                            f"function; found {len(uses)} at lines "
                            f"{', '.join(str(u.line) for u in uses)}")
    for kind, edges in (("units", unit_edges), ("modules", module_edges)):
        for component in cycles(edges):
            problems.append(f"import circle between {kind}: {' ↔ '.join(component)}")
    return problems


# ── the tests ────────────────────────────────────────────────────────────────


def test_the_source_tree_keeps_the_contract():
    assert check(SRC) == []


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "memlens"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__", "shipped"))
    return root


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n\n" + code + "\n", encoding="utf-8")


def test_an_upward_lazy_import_fails_the_check(tmp_path):
    root = _copy(tmp_path)
    _append(root / "arch.py", "def _late():\n    from memlens.cli import app\n    return app")
    problems = check(root)  # the upward import, then the circles it closes
    assert "memlens/arch.py:" in problems[0], problems
    assert "core module memlens.arch imports memlens.cli of the higher layer cli" in problems[0]
    assert any("circle" in p and "memlens.arch" in p for p in problems[1:]), problems


def test_a_circle_inside_a_layer_fails_the_check(tmp_path):
    root = _copy(tmp_path)
    _append(root / "trace" / "noise.py", "import memlens.edit.requests  # noqa")
    problems = check(root)
    assert any("circle between units" in p and "memlens.edit ↔ memlens.trace" in p
               for p in problems), problems


def test_a_string_import_and_a_second_exception_fail_the_check(tmp_path):
    root = _copy(tmp_path)
    _append(root / "tokens.py", '_LAZY = {"steer": "memlens.topk.steer"}')
    _append(root / "model.py", "from memlens.organisms.registry import ORGANISMS  # noqa")
    problems = check(root)
    assert any("core module memlens.tokens imports memlens.topk.steer" in p for p in problems)
    assert any("must be one import inside a function" in p for p in problems), problems


def test_a_module_outside_every_layer_fails_the_check(tmp_path):
    root = _copy(tmp_path)
    (root / "newthing.py").write_text('"""Not in the contract yet."""\n')
    assert check(root) == ["module memlens.newthing is in no layer of the contract; add it to "
                           "LAYERS"]
