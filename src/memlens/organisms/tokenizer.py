"""Byte-level BPE tokenizer for organisms, trained with `tokenizers`, saved as a HF tokenizer.

    tok = train_tokenizer(texts, vocab_size=4096)      # PreTrainedTokenizerFast, GPT-2 conventions
    tok.save_pretrained(out_dir)                        # AutoTokenizer.from_pretrained(out_dir)

GPT-2 conventions: no prefix space, offsets not trimmed (" Paris" covers the space), a single
special token ``<|endoftext|>`` used as eos, bos, unk and pad.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, boost_words: Iterable[str] = (),
                    boost: int = 50):
    """Train a byte-level BPE on `texts`.

    `boost_words` (e.g. fact objects) are added `boost` times each, preceded by a space, so they
    become single tokens (`" France"`): CounterFact metrics and tracing read the answer's first
    token, which is then the whole answer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    boost_text = " ".join(" " + w for w in boost_words for _ in range(boost))

    def it():
        yield from texts
        if boost_text:
            yield boost_text

    tok.train_from_iterator(it(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    fast.model_max_length = 1 << 30
    return fast
