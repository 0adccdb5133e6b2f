"""`kdpipe cache verify` finds damage and names the file; the reader refuses what it cannot trust."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import kdpipe

from kdpipe.cache import open_cache
from kdpipe.errors import KdpipeError


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("v") / "good"
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 20,
           "--top-k", 4, "--rows-per-shard", 10, "--cache", folder)
    return folder


@pytest.fixture
def cache(tmp_path, good_cache):
    copy = tmp_path / "copy"
    shutil.copytree(good_cache, copy)
    return copy


def verify_fails(cache, *needles: str) -> None:
    result = kdpipe("cache", "verify", cache, ok=False)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_flipped_byte(cache):
    shard = cache / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_fails(cache, "shard-00001.parquet: sha256 checksum mismatch")
    assert "shard-00000" not in kdpipe("cache", "verify", cache, ok=False).output


def test_truncated_shard(cache):
    shard = cache / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    verify_fails(cache, "shard-00000.parquet: size 100 bytes")


def test_missing_shard(cache):
    (cache / "shard-00001.parquet").unlink()
    verify_fails(cache, "shard-00001.parquet: missing")
    with pytest.raises(KdpipeError, match="shard-00001.parquet is missing"):
        list(open_cache(cache).iter_examples())


def test_future_format_version_and_damaged_manifest(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(KdpipeError, match="format version 99, newer than this kdpipe understands"):
        open_cache(cache)
    (cache / "manifest.json").write_text("{not json")
    verify_fails(cache, "manifest.json is damaged")


def test_shard_from_another_run(cache, tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 20,
           "--top-k", 4, "--rows-per-shard", 10, "--cache", other, "--split", "test")
    shutil.copy(other / "shard-00000.parquet", cache / "shard-00000.parquet")
    verify_fails(cache, "shard-00000.parquet: belongs to another run than", "(settings hash differs)")


def test_incomplete_cache_is_reported(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    verify_fails(cache, "incomplete, 1 shard(s) not written yet")


def test_insane_values_are_caught(cache):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kdpipe.cache.tools import check_values
    from kdpipe.cache.format import read_manifest

    table = pq.read_table(cache / "shard-00000.parquet")
    lp = table["topk_logprobs"].combine_chunks()
    flat = lp.values.values
    flipped = pa.ListArray.from_arrays(lp.offsets, pa.FixedSizeListArray.from_arrays(pc.negate(flat), 4))
    bad = table.set_column(table.schema.get_field_index("topk_logprobs"), table.schema.field("topk_logprobs"), flipped)
    problems = check_values(bad, read_manifest(cache))
    assert problems and "log-prob is positive" in problems[0]
