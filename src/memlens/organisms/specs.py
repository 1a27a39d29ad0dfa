"""What determines a model organism, and the organisms memlens knows by name.

    spec = get_spec("organism:tiny")          # or "tiny"
    spec.key()                                # hash of generator version + Python + spec
    sorted(ORGANISMS)                         # ['facts-gpt2', 'facts-gpt2-distract', ...]

Where a spec's organism lives, and how it is built on first use, is
:mod:`memlens.organisms.registry`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, replace

from memlens.errors import UnknownOrganism
from memlens.model import ORGANISM_PREFIX
from memlens.organisms.corpus import GENERATOR_VERSION, FactConfig

PYTHON_VERSION = "{}.{}".format(*sys.version_info[:2])


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
    num_threads: int = 2  # torch CPU threads while training (not in the key; see `key`)
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paragraph_repeats"] = list(self.paragraph_repeats)
        d["facts"]["people_relations"] = list(self.facts.people_relations)
        return d

    def key(self, python: str = PYTHON_VERSION) -> str:
        """Hash of generator version + Python version (the plain text is its stdlib's docstrings)
        + spec (includes seed); the description is not part of it.

        `python` ("3.11") gives the key a build on another Python would have: a shipped copy
        built on 3.11 is the same organism for a user on 3.12."""
        d = self.to_dict()
        # How it is built, not what: the thread count changes float rounding only (a build with
        # another count is the same organism up to rounding — one reason the default is shipped).
        for how_not_what in ("description", "checkpoint_every", "num_threads"):
            d.pop(how_not_what)
        # Fields added after generator 3 enter the key only when set, so caches stay valid.
        for added in ("distractor_fraction", "table_fraction", "bios"):
            if not d["facts"][added]:
                d["facts"].pop(added)
        blob = json.dumps({"generator": GENERATOR_VERSION, "python": python, "spec": d},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The facts corpus of the default organism and its layout variants (~1,660 facts, 610 subjects).
FACTS_DEFAULT = FactConfig(n_countries=100, n_cities=260, n_people=250, n_birthplaces=60,
                           n_train_templates=8, bios=True)

FACTS_GPT2 = OrganismSpec(
    "facts-gpt2", "The default: 8×256 GPT-2, ~1,660 facts (9 relations) in knowledge-augmented "
    "bios (full name in every sentence, permuted, freshly worded, one bio per subject per "
    "block); paragraphs ×1/4/16/64. Shipped with memlens.",
    arch="gpt2", n_layer=8, d_model=256, n_head=8, vocab_size=2048, facts=FACTS_DEFAULT,
    steps=6000, batch_size=8, lr=2e-3, warmup_steps=100, bf16=True, checkpoint_every=250,
    num_threads=1,
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
    name = name.removeprefix(ORGANISM_PREFIX)
    if name not in ORGANISMS:
        raise UnknownOrganism(f"unknown organism {name!r}; known organisms: "
                              f"{', '.join(sorted(ORGANISMS))}")
    return ORGANISMS[name]
