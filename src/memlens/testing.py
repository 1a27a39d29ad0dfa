"""Tiny randomly initialised models of every supported architecture, for tests and benchmarks.

    path = random_model_dir("llama", tmp_path)     # a saved HF model + tokenizer directory
    handle = memlens.load_model(str(path))
    corpus.write_text(random_text(200))            # lines of random words from TEXT

Nothing here is downloaded: the tokenizer is a byte-level BPE trained on a built-in text.
"""

from __future__ import annotations

import random
from pathlib import Path

#: The built-in text the tiny tokenizer is trained on (tests and benchmarks draw words from it).
TEXT = (
    "The Eiffel Tower is located in Paris. Toulouse is a city in France. "
    "Miles Davis plays the trumpet. The capital of Japan is Tokyo. "
    "Danielle Darrieux's mother tongue is French. Apple was founded by Steve Jobs. "
) * 4

#: Smallest sensible configs: 4 layers, d_model 64, 4 heads, d_ff 128, context 128.
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_layer=4, n_embd=64, n_head=4, n_inner=128, n_positions=128),
    "gpt_neo": dict(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=128,
                    max_position_embeddings=128, attention_types=[[["global", "local"], 2]],
                    window_size=16),
    "gptj": dict(n_layer=4, n_embd=64, n_head=4, n_inner=128, n_positions=128, rotary_dim=8),
    "gpt_neox": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128),
    "llama": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128),
    "mistral": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128),
    "qwen2": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128),
}


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (HF fast tokenizer) trained on a built-in paragraph."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_model(model_type: str, *, seed: int = 0, vocab_size: int | None = None, **overrides):
    """A randomly initialised HF causal LM of ``model_type`` (a key of TINY_CONFIGS) and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size or len(tokenizer), bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos, **{**TINY_CONFIGS[model_type], **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def random_model_dir(model_type: str, directory: Path, *, seed: int = 0, **overrides) -> Path:
    """Save :func:`random_model` to ``directory/model_type`` and return that path."""
    model, tokenizer = random_model(model_type, seed=seed, **overrides)
    path = Path(directory) / model_type
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_text(n_lines: int, words_per_line: int | tuple[int, int] = 30, *, seed: int = 0,
                rng: random.Random | None = None) -> str:
    """``n_lines`` lines of words drawn at random from :data:`TEXT` (seeded, or from ``rng``,
    which goes on from where it is): a corpus for key statistics; ``words_per_line`` is a count
    or a (min, max) range drawn per line.

        random_text(2, 3)            # two lines of three words, e.g. "Paris plays the ..."
    """
    rng = rng or random.Random(seed)
    words = TEXT.replace(".", "").split()
    lines = []
    for _ in range(n_lines):
        n = words_per_line if isinstance(words_per_line, int) else rng.randint(*words_per_line)
        lines.append(" ".join(rng.choice(words) for _ in range(n)))
    return "\n".join(lines)
