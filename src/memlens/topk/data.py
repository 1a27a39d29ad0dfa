"""Text for TopK work: an organism's corpus, cut into equal token blocks with a held-out split.

    corpus = organism_corpus("organism:facts-gpt2")      # config, tokenizer, text of the organism
    train, heldout = text_blocks(corpus.tokenizer, corpus.text, block_size=128)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlens.errors import EmptyInput, MemlensError
from memlens.files import read_text
from memlens.model import organism_name, resolve_organism

CORPUS_FILE = "corpus.txt"


@dataclass
class Corpus:
    """Everything needed to train a fresh model like an organism: its config, tokenizer, text."""

    config: Any  # transformers PretrainedConfig of the organism (architecture and sizes)
    tokenizer: Any
    text: str
    source: str  # organism reference or directory it came from


def organism_corpus(ref: str) -> Corpus:
    """Config, tokenizer and ``corpus.txt`` of an organism (``organism:NAME`` or its directory).

    The organism is built first if it is not cached yet (:func:`memlens.model.resolve_organism`).

        corpus = organism_corpus("organism:facts-llama")
    """
    from transformers import AutoConfig, AutoTokenizer

    directory = resolve_organism(ref)
    path = Path(directory) / CORPUS_FILE
    if not path.is_file():
        raise MemlensError(f"{directory} has no {CORPUS_FILE}; pass an organism (organism:NAME) "
                           "or an organism directory")
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "topk", None):
        config.topk = None  # the twin models start dense; TopK is applied by the trainer
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return Corpus(config=config, tokenizer=tokenizer, text=path.read_text(), source=str(ref))


def text_blocks(
    tokenizer, text: str, block_size: int = 128, heldout_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``text`` line by line, concatenate (EOS between lines) and cut into blocks.

    Returns (train, heldout), LongTensors (N, block_size); the held-out blocks are the last
    ``heldout_fraction`` of the text (at least one block), never seen in training.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise EmptyInput("the corpus text is empty")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(lines)["input_ids"]:
        ids.extend(row)
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // block_size
    if n_blocks < 2:
        raise EmptyInput(f"the corpus has {len(ids)} tokens: too few for two blocks of "
                         f"{block_size} (one to train on, one held out)")
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    n_heldout = max(1, round(n_blocks * heldout_fraction))
    return blocks[:-n_heldout], blocks[-n_heldout:]


def read_corpus_text(source: str) -> str:
    """Text of a corpus: a text file, or ``corpus.txt`` of an organism (``organism:NAME``) or of
    a model directory.

        text = read_corpus_text("organism:facts-gpt2")     # or "my_corpus.txt"
    """
    path = Path(source).expanduser()
    if path.is_file():
        return read_text(path, "corpus")
    if path.is_dir() or organism_name(source) is not None:
        candidate = resolve_organism(source) / CORPUS_FILE
        if candidate.is_file():
            return read_text(candidate, "corpus")
        raise MemlensError(f"{source!r} has no {CORPUS_FILE}; pass a text file with --corpus")
    raise MemlensError(f"corpus {source!r} is neither a text file, a directory with "
                       f"{CORPUS_FILE}, nor organism:NAME")


def neuron_blocks(tokenizer, text: str, block_size: int = 128, max_blocks: int = 512
                  ) -> torch.Tensor:
    """Up to ``max_blocks`` token blocks of ``text`` (train and held-out parts alike)."""
    train, heldout = text_blocks(tokenizer, text, block_size, heldout_fraction=0.0)
    return torch.cat([train, heldout])[:max_blocks]
