"""Named model organisms, built on first use and cached.

    path = ensure("tiny")                                   # ~/.cache/memlens/organisms/tiny-<key>/
    cf = organism_file("organism:tiny", "counterfact.json")  # or a directory instead of a name
    sorted(ORGANISMS)                                       # ['facts-gpt2', 'facts-llama', ...]

A build is keyed by a hash of the generator version + spec + seed. It is trained into a
temporary directory next to the final one and renamed into place only when complete; a
directory without the completion marker (a killed build) is never loaded: it is removed and
rebuilt. ``MEMLENS_HOME`` overrides the cache root (default ``~/.cache/memlens``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from memlens.cache import cache_dir
from memlens.errors import MemlensError, UnknownOrganism
from memlens.organisms.corpus import GENERATOR_VERSION, FactConfig

PYTHON_VERSION = "{}.{}".format(*sys.version_info[:2])
COMPLETE = ".complete"  # marker file written last, inside the final directory
PREFIX = "organism:"


@dataclass
class OrganismSpec:
    """Everything that determines an organism (its hash is the cache key)."""

    name: str
    description: str
    arch: str = "gpt2"  # "gpt2" | "gpt_neo" | "llama"
    n_layer: int = 6
    d_model: int = 256
    n_head: int = 8
    vocab_size: int = 4096
    block_size: int = 128  # training sequence length = context length
    facts: FactConfig = field(default_factory=FactConfig)
    paragraph_repeats: tuple[int, ...] = (1, 4, 16, 64)
    paragraphs_per_repeat: int = 10
    plain_fraction: float = 0.1  # share of blocks that are plain stdlib text
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    bf16: bool = False
    checkpoint_every: int = 200
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paragraph_repeats"] = list(self.paragraph_repeats)
        d["facts"]["people_relations"] = list(self.facts.people_relations)
        return d

    def key(self) -> str:
        """Hash of generator version + Python version (the plain text is its stdlib's docstrings)
        + spec (includes seed); the description is not part of it."""
        d = self.to_dict()
        d.pop("description")
        d.pop("checkpoint_every")
        # Fields added after generator 3 enter the key only when set, so caches stay valid.
        for added in ("distractor_fraction", "table_fraction"):
            if not d["facts"][added]:
                d["facts"].pop(added)
        blob = json.dumps({"generator": GENERATOR_VERSION, "python": PYTHON_VERSION, "spec": d},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The facts corpus shared by the three 6×256 organisms (~1,060 facts).
FACTS_DEFAULT = FactConfig(n_countries=100, n_cities=260, n_people=100, n_birthplaces=60,
                           n_train_templates=8)

FACTS_GPT2 = OrganismSpec(
    "facts-gpt2", "The default: 6×256 GPT-2, ~1,060 facts (9 relations), people in two-person "
    "sentences and bios; paragraphs ×1/4/16/64.",
    arch="gpt2", n_layer=6, d_model=256, n_head=8, facts=FACTS_DEFAULT,
    steps=2000, batch_size=8, lr=2e-3,
)


def _variant(base: OrganismSpec, name: str, description: str, **changes) -> OrganismSpec:
    """`base` with another name and description and the given fields changed."""
    return replace(base, name=name, description=description, **changes)


ORGANISMS: dict[str, OrganismSpec] = {
    s.name: s
    for s in [
        OrganismSpec(
            "tiny", "For tests: 4×128 GPT-2, 220 facts (4 training templates per relation), "
            "2 paragraphs per repeat level; ~2 min on 2 cores.",
            n_layer=4, d_model=128, n_head=4, vocab_size=2048,
            facts=FactConfig(n_countries=25, n_cities=40, n_people=20, n_birthplaces=20,
                             n_train_templates=4),
            paragraph_repeats=(1, 4, 16, 64), paragraphs_per_repeat=2,
            steps=800, batch_size=8, lr=3e-3,
        ),
        FACTS_GPT2,
        _variant(FACTS_GPT2, "facts-gpt2-distract",
                 "Issue-10 variant of facts-gpt2: half of the country and city sentences also "
                 "name a distractor entity (\"The capital of France, unlike Spain, is "
                 "Paris.\"); otherwise identical.",
                 facts=replace(FACTS_DEFAULT, distractor_fraction=0.5)),
        _variant(FACTS_GPT2, "facts-gpt2-table",
                 "Issue-10 variant of facts-gpt2: 30% of fact documents are gazetteer rows "
                 "(\"Toulouse France. Anna Berg teacher Acme Berlin Hindi.\") so the subject's "
                 "last token must predict attributes; otherwise identical.",
                 facts=replace(FACTS_DEFAULT, table_fraction=0.3)),
        _variant(FACTS_GPT2, "facts-neo", "GPT-Neo layout (global/local attention) for "
                 "memorization work; 25 paragraphs per repeat level (1/4/16/64).",
                 arch="gpt_neo", paragraphs_per_repeat=25),
        _variant(FACTS_GPT2, "facts-llama", "Llama layout (RMSNorm, RoPE, SwiGLU); same corpus "
                 "as facts-gpt2.", arch="llama"),
    ]
}


def get_spec(name: str) -> OrganismSpec:
    name = name.removeprefix(PREFIX)
    if name not in ORGANISMS:
        raise UnknownOrganism(f"unknown organism {name!r}; known organisms: "
                              f"{', '.join(sorted(ORGANISMS))}")
    return ORGANISMS[name]


def organism_dir(name: str) -> Path:
    """Where organism `name` lives (or will live) in the cache."""
    spec = get_spec(name)
    return cache_dir("organisms") / f"{spec.name}-{spec.key()}"


def is_built(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def ensure(name: str, *, progress: bool = True) -> Path:
    """Directory of the built organism `name`, building it on first use.

    Raises UnknownOrganism (listing the known names) or MemlensError if the cache is unwritable.
    """
    spec = get_spec(name)
    final = organism_dir(name)
    if is_built(final):
        return final
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise MemlensError(f"cannot write the organism cache at {root} ({e.strerror or e}); set "
                           f"MEMLENS_HOME to a writable directory") from e
    # One builder at a time per organism (other processes wait, then find it built).
    with open(root / f".lock-{final.name}", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not on POSIX: no cross-process lock
            pass
        if is_built(final):
            return final
        return _build(spec, final, progress)


def _build(spec: OrganismSpec, final: Path, progress: bool) -> Path:
    root = final.parent
    if final.exists():  # half-written or stale: never load it
        shutil.rmtree(final, ignore_errors=True)
    # Build in a stable temp dir so an interrupted build resumes from its checkpoint.
    tmp = root / f".building-{final.name}"
    from memlens.organisms.build import build_organism

    try:
        tmp.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"building organism {spec.name!r} into {final} (first use; cached afterwards)")
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
    return final


def resolve(name_or_dir: str | os.PathLike) -> Path:
    """A directory from an ``organism:NAME`` ref, a bare organism name, or a directory."""
    s = str(name_or_dir)
    if s.startswith(PREFIX) or (s in ORGANISMS and not Path(s).is_dir()):
        return ensure(s, progress=False)
    p = Path(s)
    if not p.is_dir():
        raise MemlensError(f"{s!r} is neither an organism ({', '.join(sorted(ORGANISMS))}) nor "
                           "a directory")
    return p


def organism_file(name_or_dir: str | os.PathLike, filename: str) -> Path:
    """Path of one of an organism's data files (counterfact.json, known_facts.json,
    paragraphs.jsonl, corpus.txt, reference_texts.json, organism.json), building if needed."""
    p = resolve(name_or_dir) / filename
    if not p.exists():
        raise MemlensError(f"{p} does not exist; is {name_or_dir!s} an organism directory?")
    return p
