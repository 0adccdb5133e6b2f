"""The same cache pooled twice, and overlapping caches, are named before training (issue 29, item 5). Before the
fix `--cache c/base --cache c/base/`, `./c/../c/base`, a copy, or a cache plus one of its parts trained every
shared example twice without a word. Caches are compared by resolved path, by their shard files' sha256 (a copy)
and by the example ids each shard holds (ids_sha256) of the same data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import expect_error, run_cli


@pytest.fixture(scope="module")
def split(world, tmp_path_factory) -> Path:
    """A cache-teacher run split in two parts (2 shards of 8 examples each), and their merge `whole`."""
    root = tmp_path_factory.mktemp("pooled")
    for i in (0, 1):
        run_cli("cache-teacher", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--limit", 32,
                "--top-k", 8, "--rows-per-shard", 8, "--num-shards", 2, "--shard-index", i, "--device", "cpu",
                "--cache", root / f"part{i}")
    run_cli("cache", "merge", root / "part0", root / "part1", "--output", root / "whole")
    return root


def train(world, out: Path, *caches: object, extra: tuple = (), ok: bool = False):
    args = [a for c in caches for a in ("--cache", c)]
    command = ["train-student", *args, "--model", world.student, "--output", out, "--max-steps", 1,
               "--batch-size", 4, *extra]
    return run_cli(*command) if ok else command


def test_the_same_cache_twice_is_refused_however_spelled(world, split, tmp_path, monkeypatch):
    whole = split / "whole"
    monkeypatch.chdir(split)
    copy = tmp_path / "copy"
    shutil.copytree(whole, copy)
    (tmp_path / "link").symlink_to(whole)
    for second, how in ((f"{whole}/", "the same folder"), ("./part0/../whole", "the same folder"),
                        (tmp_path / "link", "the same folder"), (copy, "a copy: the same shard files")):
        out = tmp_path / "run"
        result = expect_error(*train(world, out, whole, second, extra=("--allow-overlap",)),
                              match=f"--cache {second} is the same cache as --cache {whole} ({how}); pooling it "
                                    "twice would train")
        assert "give it once" in result.output and not out.exists()


def test_a_cache_and_one_of_its_parts_overlap(world, split, tmp_path):
    out = tmp_path / "run"
    expect_error(*train(world, out, split / "whole", split / "part1"),
                 match=f"--cache {split / 'whole'} and --cache {split / 'part1'} overlap: 2 of the latter's 2 shards "
                       "(16 examples) hold the same examples as shards of the former")
    expect_error(*train(world, out, split / "part0", split / "whole"), match="overlap: 2 of the latter's 4 shards "
                                                                              "(16 examples)")
    assert not out.exists()
    train(world, out, split / "whole", split / "part1", extra=("--allow-overlap",), ok=True)  # on purpose
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["config"]["allow_overlap"] is True


def test_the_parts_of_one_run_pool_without_a_word(world, split, tmp_path):
    """Distinct examples of the same data: no overlap, no option needed."""
    result = train(world, tmp_path / "run", split / "part0", split / "part1", ok=True)
    assert "overlap" not in result.output
