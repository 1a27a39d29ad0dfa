"""memlens: find where a transformer LM stores what it knows and has memorized; edit, erase, steer.

    import memlens
    handle = memlens.load_model("organism:facts-gpt2")

Heavy modules (torch, transformers) load on first use, so ``import memlens`` stays instant.
The package is a stack of layers — core modules (``memlens.arch``, ``memlens.hooks``,
``memlens.model``, ...), the methods (``memlens.trace``, ``memlens.edit``, ...), the organisms,
the studies, the report and the CLI — each importing only from those below it
(docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "memlens.model",
    "ModelHandle": "memlens.model",
    "MemlensError": "memlens.errors",
}

if TYPE_CHECKING:
    from memlens.errors import MemlensError
    from memlens.model import ModelHandle, load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memlens' has no attribute {name!r}")


__all__ = ["MemlensError", "ModelHandle", "load_model", "__version__"]
