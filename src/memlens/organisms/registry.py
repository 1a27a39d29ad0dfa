"""Named model organisms: shipped with memlens, or built on first use and cached.

    path = ensure("facts-gpt2")         # the shipped copy: src/memlens/organisms/shipped/facts-gpt2/
    path = ensure("tiny")               # built once into ~/.cache/memlens/organisms/tiny-<key>/
    path = ensure("facts-gpt2", from_scratch=True)          # ignore the shipped copy: build it
    path = resolve("organism:tiny")    # a directory from organism:NAME, a name or a directory
    sorted(ORGANISMS)                                       # ['facts-gpt2', 'facts-llama', ...]

The specs and their keys are :mod:`memlens.organisms.specs`. A build is keyed by a hash of
the generator version + spec + seed. It is trained into
``.building-<name>-<key>/`` next to the final directory and renamed into place only when
complete; a directory without the completion marker (a killed build) is never loaded: it is
removed and rebuilt. A killed build resumes from its last training checkpoint when the same
key is built again; a successful build removes the ``.building-*`` directories no registered
organism would resume (other keys) and no process is building. The empty ``.lock-<name>-<key>``
files that serialise builders stay (removing one while another process waits on it would let
two processes build at once). ``MEMLENS_HOME`` overrides the cache root (default
``~/.cache/memlens``).

A shipped organism (``SHIPPED_ROOT/<name>/``, read-only package data written only by
:func:`memlens.organisms.ship.ship`) is used when its ``MANIFEST.json`` has the spec's key and
its files have the sizes the manifest lists; otherwise memlens warns once and uses the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from memlens.cache import BUILDING, cache_dir
from memlens.errors import MemlensError
from memlens.model import ORGANISM_PREFIX
from memlens.organisms.specs import ORGANISMS, OrganismSpec, get_spec

COMPLETE = ".complete"  # marker file written last, inside the final directory
SHIPPED_ROOT = Path(__file__).with_name("shipped")  # package data: one directory per organism
MANIFEST = "MANIFEST.json"  # in a shipped directory: name, key, python, files → sha256, sizes


def organism_dir(name: str) -> Path:
    """Where organism `name` lives (or will live) in the cache."""
    spec = get_spec(name)
    return cache_dir("organisms") / f"{spec.name}-{spec.key()}"


def shipped_dir(name: str) -> Path:
    """Where the shipped copy of organism `name` lives (or would live) in the package."""
    return SHIPPED_ROOT / get_spec(name).name


def is_built(path: Path) -> bool:
    """Whether `path` is a complete cache build (has the completion marker)."""
    return (Path(path) / COMPLETE).is_file()


def read_manifest(path: Path) -> dict:
    """The parsed ``MANIFEST.json`` of a shipped directory (MemlensError if absent or invalid)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise MemlensError(f"cannot read {Path(path) / MANIFEST}: {e}") from e


def shipped_copy(name: str) -> tuple[Path | None, str | None]:
    """``(directory, None)`` if a usable shipped copy of `name` exists, ``(None, reason)`` if one
    exists but cannot be used, ``(None, None)`` if none is shipped.

    Cheap (one small JSON read and a stat per file): it checks the manifest's key against the
    spec's key for the manifest's Python version, and every file's size. Digests are checked by
    :func:`memlens.organisms.ship.verify` (the tests and `ship` run it).
    """
    spec = get_spec(name)
    path = shipped_dir(name)
    if not (path / MANIFEST).exists():
        return None, None
    try:
        manifest = read_manifest(path)
        python = manifest["python"]
        key, sizes = manifest["key"], dict(manifest["sizes"])
    except (MemlensError, KeyError, TypeError, ValueError) as e:
        return None, f"its manifest is invalid ({e})"
    if key != spec.key(python=python):
        return None, (f"it was built for key {key}, the spec's key is now {spec.key(python=python)}"
                      f" (the spec changed; re-ship it)")
    for rel, size in sizes.items():
        f = path / rel
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            return None, (f"{rel} is {'missing' if actual is None else f'{actual:,} bytes'}, the "
                          f"manifest says {size:,} (a Git LFS pointer or an incomplete checkout?)")
    return path, None


def ensure(name: str, *, progress: bool = True, from_scratch: bool = False) -> Path:
    """Directory of the organism `name`: its shipped copy if usable, else the cache build
    (built on first use). `from_scratch` ignores the shipped copy (reproduction).

    Raises UnknownOrganism (listing the known names) or MemlensError if the cache is unwritable.
    """
    spec = get_spec(name)
    if not from_scratch:
        shipped, why_not = shipped_copy(spec.name)
        if shipped is not None:
            return shipped
        if why_not is not None:
            warnings.warn(f"not using the shipped organism {spec.name!r}: {why_not}; using the "
                          f"cache build instead", stacklevel=2)
    final = organism_dir(name)
    if is_built(final):
        return final
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()  # unnamed where the OS allows: nothing to leak
    except OSError as e:
        raise MemlensError(f"cannot write the organism cache at {root} ({e.strerror or e}); set "
                           f"MEMLENS_HOME to a writable directory") from e
    # One builder at a time per organism (other processes wait, then find it built).
    with _build_lock(root, final.name):
        if is_built(final):
            return final
        return _build(spec, final, progress)


@contextlib.contextmanager
def _build_lock(root: Path, name: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of building ``name`` (an flock on ``root/.lock-NAME``, released on exit);
    yields False instead when ``wait`` is False and another process holds it. Without fcntl
    (not POSIX) there is no cross-process lock and it always yields True."""
    with open(root / f".lock-{name}", "a") as lock:
        try:
            import fcntl
        except ImportError:
            yield True
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _remove_dead_builds(root: Path) -> None:
    """Remove the ``.building-*`` directories in ``root`` that no registered organism resumes
    (killed builds of another key: another generator or Python version, a changed or removed
    spec) and that no process is building now (their lock is free)."""
    resumable = {organism_dir(name).name for name in ORGANISMS}
    for tmp in root.glob(f"{BUILDING}*"):
        name = tmp.name.removeprefix(BUILDING)
        if name in resumable or not tmp.is_dir():
            continue
        with contextlib.suppress(OSError), _build_lock(root, name, wait=False) as free:
            if free:
                shutil.rmtree(tmp, ignore_errors=True)


def _build(spec: OrganismSpec, final: Path, progress: bool) -> Path:
    root = final.parent
    if final.exists():  # half-written or stale: never load it
        shutil.rmtree(final, ignore_errors=True)
    # Build in a stable temp dir so an interrupted build resumes from its checkpoint.
    tmp = root / f"{BUILDING}{final.name}"
    from memlens.organisms.build import build_organism

    try:
        tmp.mkdir(parents=True, exist_ok=True)
        if progress:
            shipped_meta = shipped_dir(spec.name) / "organism.json"
            minutes = (json.loads(shipped_meta.read_text()).get("build_seconds", 0) / 60
                       if shipped_meta.is_file() else 0)
            took = f"; the shipped copy took {minutes:.0f} min" if minutes else ""
            print(f"building organism {spec.name!r} into {final} (cached afterwards{took})",
                  file=sys.stderr)
        build_organism(spec, tmp, progress=progress)
        (tmp / COMPLETE).write_text(spec.key())
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_built(final):  # another process may have won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise MemlensError(f"could not build organism {spec.name!r} in {root}: {e}") from e
    _remove_dead_builds(root)
    return final


def build_id(path: str | os.PathLike) -> str:
    """A name for the organism build in `path`, for keying results derived from it:
    ``<name>-<key>`` for a cache build (its directory name), ``<name>-<key>-shipped-<sha256 of
    the weights, 8 hex>`` for a shipped copy (whose directory name is only ``<name>``)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return path.name
    manifest = read_manifest(path)
    return (f"{manifest['name']}-{manifest['key']}-shipped-"
            f"{manifest['files']['model.safetensors'][:8]}")


def resolve(name_or_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """A directory from an ``organism:NAME`` ref, a bare organism name, or a directory; the
    organism is built first if needed (the target of :func:`memlens.model.resolve_organism`)."""
    s = str(name_or_dir)
    if s.startswith(ORGANISM_PREFIX) or (s in ORGANISMS and not Path(s).is_dir()):
        return ensure(s, progress=progress)
    p = Path(s)
    if not p.is_dir():
        raise MemlensError(f"{s!r} is neither an organism ({', '.join(sorted(ORGANISMS))}) nor "
                           "a directory")
    return p
