"""Save an edited model to a NEW directory, atomically, with a log of what was edited.

    save_edited(handle, "out/toulouse-japan", edit)
    # out/toulouse-japan/{config.json, model.safetensors, tokenizer files, edit_log.json}

The model is written to a temporary sibling directory ``.NAME.tmp-PID-XXXX`` and renamed into
place when complete; a failed save removes it. A save killed mid-write cannot clean up, so each
save first removes the temporary folders in its parent whose writing process is gone (and, for
its own NAME, those of older memlens versions, which carry no process id). The source model's
directory (or anything inside it) and non-empty existing directories are refused: editing never
overwrites a model on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memlens.errors import MemlensError
from memlens.ledger import EditHandle
from memlens.model import PARTIAL_SAVE


class UnsafeSaveTarget(MemlensError):
    """The directory to save into is the source model's, or not empty."""


def save_edited(handle: Any, out_dir: str | Path, edits: EditHandle | Sequence[EditHandle],
                *, extra: dict[str, Any] | None = None) -> Path:
    """Write the model (safetensors), its tokenizer and ``edit_log.json`` to ``out_dir``."""
    out = Path(out_dir).expanduser().resolve()
    if handle.source_dir is not None:
        source = Path(handle.source_dir).resolve()
        if out == source or source in out.parents:
            raise UnsafeSaveTarget(f"refusing to save into the source model's directory {source}; "
                                   "choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnsafeSaveTarget(f"{out} exists and is not an empty directory; choose a new one")
    edits = [edits] if isinstance(edits, EditHandle) else list(edits)
    if any(e.undone for e in edits):
        raise MemlensError("an edit to be saved has been undone; the model no longer holds it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        handle.model.save_pretrained(tmp, safe_serialization=True)
        handle.tokenizer.save_pretrained(tmp)
        log = {"source": handle.ref, "fingerprint": handle.fingerprint(),
               "edits": [e.to_dict() for e in edits], **(extra or {})}
        (tmp / "edit_log.json").write_text(json.dumps(log, indent=2, default=str))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def remove_stale_saves(parent: Path, name: str) -> list[Path]:
    """Delete the temporary folders of killed saves in ``parent``: those whose process id names
    no running process, and those of saves into ``name`` without a process id. Returns them."""
    removed = []
    for path in parent.iterdir():
        match = PARTIAL_SAVE.match(path.name)
        if match is None or not path.is_dir():
            continue
        pid = match.group("pid")
        if (pid is None and match.group("name") == name) or \
                (pid is not None and not _process_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
