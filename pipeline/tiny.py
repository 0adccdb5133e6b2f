"""Small models built from a config, no download: for the offline demo, the tests and custom students.

`train_tokenizer` trains a byte-level BPE on a corpus; `init_model` builds a randomly initialised
Qwen3 of the given size with that tokenizer (or an existing one) and saves both.

The vocabulary is the 256 byte tokens, the special tokens (`SPECIAL_TOKENS`), then the merges BPE
learns from the corpus until `vocab_size`: never fewer than 258 tokens, and fewer merges than asked
when the corpus has no more pairs to merge. `char_level=True` learns no merges: one token per byte,
so one per character of ASCII text (a task that works on letters, e.g. reversing words, wants that:
merges cut a word and its reverse into different pieces).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def base_vocabulary() -> int:
    """Tokens of every byte-level vocabulary before any merge: the 256 bytes and the special tokens."""
    from tokenizers import pre_tokenizers

    return len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, char_level: bool = False) -> Any:
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) of `texts`; `char_level`: no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocabulary() if char_level else vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def vocabulary_note(tokenizer: Any, vocab_size: int, char_level: bool = False) -> str | None:
    """What to tell the user when the trained vocabulary is not the size asked for (None when it is)."""
    size, floor = len(tokenizer), base_vocabulary()
    if char_level:
        return (f"note: --char-level: {size} tokens (256 bytes + {len(SPECIAL_TOKENS)} special tokens, "
                "no merges)")
    if vocab_size < floor:
        return (f"note: --vocab-size {vocab_size} is raised to {size}: a byte-level vocabulary holds the "
                f"256 byte tokens and {len(SPECIAL_TOKENS)} special tokens before any merge")
    if size < vocab_size:
        return (f"note: the corpus gave only {size - floor} merges: "
                f"{size} tokens, not --vocab-size {vocab_size}")
    return None


def init_model(
    output: str | Path | None,
    tokenizer: Any,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    vocab_size: int | None = None,
    seed: int = 0,
    tie: bool = False,
    like: Any = None,
) -> Any:
    """A randomly initialised Qwen3 causal LM (or one of `like`'s architecture: a transformers config
    whose sizes are replaced), saved with `tokenizer` to `output` unless None; returns the model.

    `vocab_size` may exceed the tokenizer's length (padded embedding rows, as Qwen's checkpoints have).
    head_dim stays >= 32 so that vLLM's CPU attention accepts the model. The config's bos/eos/pad ids are
    the tokenizer's; `tie`: the LM head is the embedding matrix.
    """
    from transformers import AutoModelForCausalLM, Qwen3Config

    from kdpipe.students import like_config, token_ids

    sizes = {"hidden_size": hidden_size, "intermediate_size": intermediate_size or 4 * hidden_size,
             "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
             "num_key_value_heads": num_kv_heads, "head_dim": head_dim}
    if like is not None:
        config = like_config(like, sizes, tokenizer, tie)
    else:
        config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                             tie_word_embeddings=tie, **sizes, **token_ids(tokenizer))
    if vocab_size:
        config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
    return model
