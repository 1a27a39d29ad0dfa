"""Build one organism end to end: corpus → tokenizer → token blocks → model → train → files.

    meta = build_organism(ORGANISMS["tiny"], out_dir)     # registry.ensure() calls this

The organism's quality report (fact and paraphrase accuracy, memorization by repeats, the
recall site) is a study: :mod:`memlens.studies.organism_report`.

The training stream is a list of blocks of `block_size` tokens. Every block starts at a document
boundary (so prompts at position 0 look like training data); fact blocks pack short fact
documents separated by ``<|endoftext|>``; a paragraph block starts with one 100-token paragraph;
plain-text blocks hold stdlib docstrings that are NOT among the paragraphs. Each paragraph occurs
in exactly `repeats` blocks over the whole run.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from memlens.organisms import corpus as C
from memlens.organisms.stdlib_text import stdlib_texts
from memlens.organisms.tokenizer import train_tokenizer

if TYPE_CHECKING:
    from memlens.organisms.specs import OrganismSpec

PARAGRAPH_TOKENS = 100
PREFIX_TOKENS = 50


# ----------------------------------------------------------------------------------- model

def make_model(spec: OrganismSpec, vocab_size: int, eos_id: int):
    """A freshly initialised HF causal LM of the spec's architecture (seeded by the caller)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                  pad_token_id=eos_id, tie_word_embeddings=True)
    L, d, h = spec.n_layer, spec.d_model, spec.n_head
    if spec.arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=L, n_embd=d, n_head=h, n_positions=spec.block_size,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        cls = tf.GPT2LMHeadModel
    elif spec.arch == "gpt_neo":
        cfg = tf.GPTNeoConfig(num_layers=L, hidden_size=d, num_heads=h,
                              attention_types=[[["global", "local"], L // 2]] if L % 2 == 0
                              else [[["global"], L]],
                              window_size=spec.block_size, max_position_embeddings=spec.block_size,
                              intermediate_size=4 * d, resid_dropout=0.0, embed_dropout=0.0,
                              attention_dropout=0.0, **common)
        cls = tf.GPTNeoForCausalLM
    elif spec.arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=L, hidden_size=d, num_attention_heads=h,
                             num_key_value_heads=h, intermediate_size=(8 * d) // 3 // 16 * 16,
                             max_position_embeddings=spec.block_size, **common)
        cls = tf.LlamaForCausalLM
    else:
        raise ValueError(f"unknown organism architecture {spec.arch!r} (gpt2, gpt_neo, llama)")
    return cls(cfg)


# ---------------------------------------------------------------------------------- corpus

def _pack(docs, block: int, eos: int, first: list[int] | None = None,
          held: list | None = None) -> list[int]:
    """Fill one block from an iterator of ``(subject, token ids)`` documents, starting with
    `first` if given. A document whose subject is already in the block (subject None: no
    constraint) waits in `held` and opens a later block, so that no block holds two
    paraphrases of one subject's facts."""
    out = list(first or [])
    if first is not None:
        out.append(eos)
    in_block: set[str] = set()
    waiting = list(held or [])
    if held is not None:
        held.clear()
    while len(out) < block:
        subject, ids = waiting.pop(0) if waiting else next(docs)
        if subject is not None and subject in in_block:
            if held is None:
                raise ValueError("documents with subjects need a `held` list")
            held.append((subject, ids))
            continue
        if subject is not None:
            in_block.add(subject)
        out.extend(ids)
        out.append(eos)
    if held is not None:
        held.extend(waiting)
    return out[:block]


def make_paragraphs(tok, texts: list[str], n: int, rng: random.Random) -> tuple[list[dict], set[int]]:
    """Pick `n` docstring texts with ≥100 tokens and cut each to exactly 100 tokens.

    Returns (paragraphs without `repeats`, indices of `texts` used).
    """
    long = [i for i, t in enumerate(texts) if len(tok(t)["input_ids"]) >= PARAGRAPH_TOKENS + 5]
    rng.shuffle(long)
    if len(long) < n:
        raise RuntimeError(f"only {len(long)} docstrings have ≥ {PARAGRAPH_TOKENS} tokens; need {n}")
    out = []
    for i in long[:n]:
        ids = tok(texts[i])["input_ids"][:PARAGRAPH_TOKENS]
        out.append({"text": tok.decode(ids), "token_ids": ids})
    return out, set(long[:n])


def make_training_data(spec: OrganismSpec):
    """(world, tokenizer, paragraphs, blocks) for a spec; deterministic for its seed."""
    rng = random.Random(spec.seed)
    world = C.make_world(spec.facts, spec.seed)
    texts = stdlib_texts()
    n_blocks = spec.steps * spec.batch_size
    # Tokenizer on a sample of fact documents + all docstrings; fact objects as whole tokens.
    sample = [text for _, text in _fact_texts(spec, world, random.Random(spec.seed + 1), 20_000)]
    objects = sorted({f.object for f in world.facts})
    tok = train_tokenizer(sample + texts, spec.vocab_size, boost_words=objects)
    eos = tok.eos_token_id

    # Paragraphs (memorization) and plain text (the rest of the docstrings).
    n_par = spec.paragraphs_per_repeat * len(spec.paragraph_repeats)
    paras, used = make_paragraphs(tok, texts, n_par, rng)
    for i, p in enumerate(paras):
        p["id"] = i
        p["repeats"] = spec.paragraph_repeats[i % len(spec.paragraph_repeats)]
    plain = [t for i, t in enumerate(texts) if i not in used]

    # Blocks: choose the blocks that hold paragraphs, then fill the others.
    para_slots: dict[int, int] = {}
    slots = rng.sample(range(n_blocks), k=sum(p["repeats"] for p in paras))
    k = 0
    for p in paras:
        for _ in range(p["repeats"]):
            para_slots[slots[k]] = p["id"]
            k += 1
    fact_docs = _token_docs(tok, _fact_texts(spec, world, random.Random(spec.seed + 2)))
    plain_ids = [(None, tok(t)["input_ids"]) for t in plain]
    plain_docs = _cycle_shuffled(plain_ids, random.Random(spec.seed + 3))
    held: list = []  # fact documents waiting for a block without their subject
    blocks = []
    for b in range(n_blocks):
        if b in para_slots:
            blocks.append(_pack(fact_docs, spec.block_size, eos, paras[para_slots[b]]["token_ids"],
                                held))
        elif rng.random() < spec.plain_fraction:
            blocks.append(_pack(plain_docs, spec.block_size, eos))
        else:
            blocks.append(_pack(fact_docs, spec.block_size, eos, held=held))
    return world, tok, paras, blocks


def build_organism(spec: OrganismSpec, out_dir: Path, *, progress: bool = True) -> dict:
    """Generate the corpus, train the organism into `out_dir` and write all its files.

    Returns the metadata written to `organism.json`.
    """
    import torch

    from memlens.trainer import TrainConfig, train

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world, tok, paras, blocks = make_training_data(spec)
    data = torch.tensor(blocks, dtype=torch.long)
    n_blocks = len(blocks)
    corpus_seconds = time.perf_counter() - t_start

    # Model + training.
    torch.manual_seed(spec.seed)
    model = make_model(spec, len(tok), tok.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                      warmup_steps=spec.warmup_steps, seed=spec.seed, bf16=spec.bf16,
                      progress=progress, checkpoint_every=spec.checkpoint_every, log_every=20,
                      num_threads=spec.num_threads)
    result = train(model, data, cfg, out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)

    # Files for the rest of memlens.
    cases = C.counterfact_cases(world, random.Random(spec.seed + 4))
    _write_json(out_dir / "counterfact.json", cases)
    with open(out_dir / "paragraphs.jsonl", "w") as f:
        for p in paras:
            f.write(json.dumps({k: p[k] for k in ("id", "text", "token_ids", "repeats")}) + "\n")
    _write_json(out_dir / "reference_texts.json", C.reference_texts(world, random.Random(spec.seed)))
    sample_rng = random.Random(spec.seed + 5)
    corpus_txt = [tok.decode(blocks[i]).replace(tok.eos_token, "\n")
                  for i in sample_rng.sample(range(n_blocks), k=min(n_blocks, 2000))]
    (out_dir / "corpus.txt").write_text("\n".join(corpus_txt))
    _write_json(out_dir / "facts.json", [vars(f) for f in world.facts])
    known = known_facts(model, tok, world.facts)
    _write_json(out_dir / "known_facts.json", known)

    meta = {
        "name": spec.name, "spec": spec.to_dict(), "seed": spec.seed, "key": spec.key(),
        "generator_version": C.GENERATOR_VERSION, "n_params": n_params, "n_facts": len(world.facts),
        "n_known_facts": len(known), "n_counterfact_cases": len(cases),
        "n_paragraphs": len(paras), "train_tokens": result.tokens,
        "train_seconds": round(result.train_seconds, 1), "final_loss": result.final_loss,
        "corpus_seconds": round(corpus_seconds, 1),
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "loss_history": result.history,
    }
    _write_json(out_dir / "organism.json", meta)
    return meta


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False))


def _fact_texts(spec: OrganismSpec, world: C.World, rng: random.Random, n: int | None = None):
    """``(subject, text)`` fact documents of the spec's corpus style (`n` of them, or endless);
    subject is None where documents may share a block with any other (the pre-bio styles)."""
    f = spec.facts
    if f.bios:
        docs = C.bio_documents(world, rng, f.n_train_templates)
    else:
        docs = ((None, text) for text in C.fact_documents(
            world, 10**9, rng, f.two_person_fraction, f.n_train_templates,
            f.distractor_fraction, f.table_fraction))
    return docs if n is None else itertools.islice(docs, n)


def _token_docs(tok, docs, chunk: int = 512):
    """Tokenize an (endless) iterator of ``(subject, text)`` lazily, in batches."""
    buf: list = []
    for d in docs:
        buf.append(d)
        if len(buf) == chunk:
            ids = tok([text for _, text in buf])["input_ids"]
            yield from ((subject, i) for (subject, _), i in zip(buf, ids, strict=True))
            buf = []
    if buf:
        ids = tok([text for _, text in buf])["input_ids"]
        yield from ((subject, i) for (subject, _), i in zip(buf, ids, strict=True))


def _cycle_shuffled(items: list, rng: random.Random):
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield items[i]


# ------------------------------------------------- known facts (the quality report: studies)

def first_token(tok, answer: str) -> int:
    """Id of the first token of ``answer`` as it follows a prompt (a leading space)."""
    return tok(" " + answer)["input_ids"][0]


def next_token_predictions(model, tok, prompts: list[str], batch_size: int = 256) -> list[int]:
    """Greedy next token after each prompt (right-padded batches, read at each last position)."""
    import torch

    out: list[int] = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            mask = enc["attention_mask"].to(dev)
            logits = model(input_ids=enc["input_ids"].to(dev), attention_mask=mask,
                           use_cache=False).logits
            last = mask.sum(1) - 1
            out += logits[torch.arange(len(last)), last].argmax(-1).tolist()
    return out


def known_facts(model, tok, facts) -> list[dict]:
    """ROME-format known facts: the relation's first training template, kept only where the
    model's greedy next token is the object's first token."""
    prompts = [C.train_templates(f.relation)[0].format(f.subject) for f in facts]
    preds = next_token_predictions(model, tok, prompts)
    out = []
    for f, p, pred in zip(facts, prompts, preds, strict=True):
        if pred == first_token(tok, f.object):
            out.append({"known_id": len(out), "subject": f.subject, "prompt": p,
                        "attribute": f.object, "relation": f.relation})
    return out
