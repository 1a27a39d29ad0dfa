"""Ship an organism with memlens: copy a finished build into the package, with a manifest.

    path = ship("facts-gpt2")              # from the cache build of the spec's current key
    manifest = verify(path)                # re-hash every file against MANIFEST.json

A maintainer's tool, run in a repository checkout (the shipped directory is package data that
is committed; nothing else ever writes into it). The manifest records the spec's key, the
Python version of the build, the weights' dtype and every file's sha256 and size; ``ensure``
uses the shipped copy when its key matches the spec and its sizes match the manifest.

Weights rule: a ``model.safetensors`` of at most ``MAX_FLOAT32_MB`` MB is shipped as trained
(float32, exact). A bigger one has to be stored in bf16/fp16 (and upcast on load); that is not
implemented yet, so `ship` refuses it with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from memlens.errors import MemlensError
from memlens.organisms import registry
from memlens.organisms.specs import PYTHON_VERSION, get_spec
from memlens.trainer import CHECKPOINT

MAX_FLOAT32_MB = 50
WEIGHTS = "model.safetensors"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_dtype(path: Path) -> str:
    """The tensors' dtype(s) in a safetensors file, read from its header ("F32", or "BF16+F32")."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return "+".join(sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"}))


def shipped_files(build: Path) -> list[str]:
    """Relative paths of the files of a build that are shipped: every regular file except
    hidden ones (the completion marker, locks) and a training checkpoint."""
    out = []
    for f in sorted(build.rglob("*")):
        rel = f.relative_to(build)
        if f.is_file() and rel.name != CHECKPOINT and not any(p.startswith(".") for p in rel.parts):
            out.append(rel.as_posix())
    return out


def ship(name: str, built_dir: str | os.PathLike | None = None) -> Path:
    """Copy the complete build `built_dir` (default: the cache build of the spec's current key)
    of organism `name` into ``registry.SHIPPED_ROOT / name`` with a ``MANIFEST.json``, replacing
    a previous shipped copy. Returns the shipped directory.

    The copy is written next to the target, verified, then renamed into place, so a failure
    leaves the previous copy as it was. Raises MemlensError if the build is incomplete, of
    another key, or has weights above the float32 size limit.
    """
    spec = get_spec(name)
    build = Path(built_dir) if built_dir is not None else registry.organism_dir(spec.name)
    key = spec.key()
    hint = f"build it first: memlens organism build {spec.name} --from-scratch"
    if not registry.is_built(build):
        raise MemlensError(f"{build} is not a complete build of {spec.name!r} (no "
                           f"{registry.COMPLETE} marker); {hint}")
    meta = json.loads((build / "organism.json").read_text())
    marker = (build / registry.COMPLETE).read_text().strip()
    if {marker, meta.get("key")} != {key} or meta.get("name") != spec.name:
        raise MemlensError(f"{build} holds {meta.get('name')!r} with key {meta.get('key')} "
                           f"(marker {marker}), not {spec.name!r} with the spec's key {key}; {hint}")
    weights_mb = (build / WEIGHTS).stat().st_size / 2**20
    if weights_mb > MAX_FLOAT32_MB:
        raise MemlensError(f"{WEIGHTS} is {weights_mb:.0f} MB > {MAX_FLOAT32_MB} MB: store it in "
                           "bf16/fp16 to ship it (not implemented)")
    final = registry.shipped_dir(spec.name)
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.name}.tmp-"))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the package data from other users
    except OSError as e:
        raise MemlensError(f"cannot write the shipped organisms at {root}: {e}") from e
    old = root / f".{spec.name}.old-{os.getpid()}"
    try:
        files: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for rel in shipped_files(build):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(build / rel, tmp / rel)
            files[rel], sizes[rel] = file_sha256(tmp / rel), (tmp / rel).stat().st_size
        manifest = {"name": spec.name, "key": key, "generator_version": meta["generator_version"],
                    "python": PYTHON_VERSION, "dtype": safetensors_dtype(tmp / WEIGHTS),
                    "files": files, "sizes": sizes}
        (tmp / registry.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        verify(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_manifest(directory: Path, fields: dict) -> dict:
    """Write ``directory/MANIFEST.json``: ``fields`` plus every shipped file's sha256 and size
    (:func:`shipped_files`); returns the manifest. For shipped data other than organisms."""
    files = {rel: file_sha256(directory / rel) for rel in shipped_files(directory)
             if rel != registry.MANIFEST}
    sizes = {rel: (directory / rel).stat().st_size for rel in files}
    manifest = {**fields, "files": files, "sizes": sizes}
    (directory / registry.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify(path: str | os.PathLike) -> dict:
    """Check every file of the shipped directory `path` against its manifest (size and sha256)
    and that no unlisted file is present; return the manifest. Raises MemlensError naming the
    first file that differs."""
    path = Path(path)
    manifest = registry.read_manifest(path)
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise MemlensError(f"{f} is missing (listed in {registry.MANIFEST})")
        if f.stat().st_size != manifest["sizes"][rel] or file_sha256(f) != digest:
            raise MemlensError(f"{f} does not match its sha256 in {registry.MANIFEST} (corrupted, "
                               "or changed after shipping)")
    extra = sorted(set(shipped_files(path)) - set(manifest["files"]) - {registry.MANIFEST})
    if extra:
        raise MemlensError(f"{path} holds files its manifest does not list: {', '.join(extra)} "
                           "(nothing may write into a shipped organism)")
    return manifest
