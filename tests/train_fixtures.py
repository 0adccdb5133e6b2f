"""Fixtures of the stage-two tests: tiny teachers, students and caches built once per session (no downloads).

Import with ``from train_fixtures import *`` (pytest finds fixtures in a test module's namespace).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KDPIPE_NO_PROGRESS", "1")

__all__ = ["World", "world", "run_cli", "student_kwargs"]


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


def student_kwargs() -> dict:
    return {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 32}


def _texts(n: int) -> list[str]:
    from kdpipe import arithmetic
    from kdpipe.templates import ARITHMETIC

    return [ARITHMETIC.format(instruction=r["instruction"]) + " " + r["output"] for r in arithmetic.generate("train")[:n]]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    from kdpipe import tiny
    from kdpipe.stages import cache_teacher

    root = tmp_path_factory.mktemp("stage2")
    tok = tiny.train_tokenizer(_texts(600), vocab_size=300)
    other = tiny.train_tokenizer(_texts(600), vocab_size=280)
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


def run_cli(*args: object, ok: bool = True):
    """`kdpipe ARGS` in-process; with ok=True, fail the test on a non-zero exit."""
    from click.testing import CliRunner

    from kdpipe.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def expect_error(*args: object, match: str):
    """`kdpipe ARGS` must fail with a message (not a traceback) containing `match`."""
    result = run_cli(*args, ok=False)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
    assert match in result.output, result.output
    return result
