"""Session-wide fixtures: a tiny tokenizer and tiny Qwen3 teachers built at test time (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS_EXTRA = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n### Human: ### Assistant:",
    "Classify the sentiment of this review as negative or positive. Review: a great film, wonderful acting. Sentiment: positive",
    "Review: boring and far too long, a terrible plot. Sentiment: negative <think>\n</think>",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from kdpipe import arithmetic, tiny
    from kdpipe.templates import ARITHMETIC

    rows = arithmetic.generate("train")[:1000]
    texts = [ARITHMETIC.format(instruction=r["instruction"]) + " " + r["output"] for r in rows] + CORPUS_EXTRA * 20
    return tiny.train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised 2-layer Qwen3 (head_dim 32) with the tiny tokenizer, saved in fp32."""
    from kdpipe import tiny

    path = tmp_path_factory.mktemp("models") / "teacher"
    tiny.init_model(path, tiny_tokenizer, seed=0)
    return path


@pytest.fixture(scope="session")
def padded_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Like tiny_model_dir, but with more embedding rows than tokens (as Qwen's 151936 vs 151669)."""
    from kdpipe import tiny

    path = tmp_path_factory.mktemp("models") / "padded"
    tiny.init_model(path, tiny_tokenizer, vocab_size=len(tiny_tokenizer) + 64, seed=1)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder, so a default `cache/` lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path

