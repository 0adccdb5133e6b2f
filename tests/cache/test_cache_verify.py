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


def test_a_stray_shard_file_is_named(cache):
    """Issue 29 item 11: a shard file the manifest does not list (a stray copy, or one written by a run killed
    before recording it) was never reported."""
    shutil.copy(cache / "shard-00001.parquet", cache / "shard-00007.parquet")
    verify_fails(cache, "shard-00007.parquet: a shard file the manifest does not list", "rerun the cache-teacher "
                 "command to adopt it; or a stray copy: delete it")
    (cache / "shard-00007.parquet").unlink()
    assert kdpipe("cache", "verify", cache).exit_code == 0


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

    from kdpipe.cache.format import read_manifest
    from kdpipe.cache.tools import check_values

    table = pq.read_table(cache / "shard-00000.parquet")
    lp = table["topk_logprobs"].combine_chunks()
    flat = lp.values.values
    flipped = pa.ListArray.from_arrays(lp.offsets, pa.FixedSizeListArray.from_arrays(pc.negate(flat), 4))
    bad = table.set_column(table.schema.get_field_index("topk_logprobs"), table.schema.field("topk_logprobs"), flipped)
    problems = check_values(bad, read_manifest(cache))
    assert problems and "log-prob is positive" in problems[0]


# ---------------------------------------------------------------- fast verification before use (verified.py)


@pytest.fixture(scope="module")
def good_compact(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("vc") / "compact"
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 20,
           "--top-k", 4, "--rows-per-shard", 10, "--encoding", "compact", "--cache", folder)
    return folder


@pytest.fixture
def compact(tmp_path, good_compact):
    copy = tmp_path / "compact"
    shutil.copytree(good_compact, copy)
    return copy


def flip_in_column(shard, column: str) -> None:
    """Flip one byte inside the (compressed) pages of a column of the first row group, in place."""
    import pyarrow.parquet as pq

    rg = pq.ParquetFile(shard).metadata.row_group(0)
    chunk = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.startswith(column))
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def test_cache_verify_finds_a_flipped_byte_in_an_id_column(compact):
    flip_in_column(compact / "shard-00001.parquet", "topk_ids")
    verify_fails(compact, "shard-00001.parquet: sha256 checksum mismatch")
    assert "shard-00000" not in kdpipe("cache", "verify", compact, ok=False).output


@pytest.fixture
def hashed(monkeypatch):
    """The shard files hashed (Store.sha256 calls), in order."""
    from kdpipe.cache.storage import Store

    names: list[str] = []
    real = Store.sha256

    def counting(self, name):
        names.append(name)
        return real(self, name)

    monkeypatch.setattr(Store, "sha256", counting)
    return names


def test_fast_verification_hashes_only_changed_shards(compact, hashed):
    import os

    from kdpipe.cache.tools import open_checked
    from kdpipe.cache.verified import RECORD

    open_checked(compact)
    assert hashed == ["shard-00000.parquet", "shard-00001.parquet"]  # no record yet: every shard
    record = json.loads((compact / RECORD).read_text())["shards"]
    assert set(record) == {"shard-00000.parquet", "shard-00001.parquet"}
    hashed.clear()
    open_checked(compact)
    assert hashed == []  # nothing changed: sizes and manifest only
    shard = compact / "shard-00001.parquet"
    data = shard.read_bytes()
    tmp = compact / "replacement"
    tmp.write_bytes(data)
    os.replace(tmp, shard)  # the same bytes, a new file: hashed again, then remembered
    open_checked(compact)
    assert hashed == ["shard-00001.parquet"]
    hashed.clear()
    open_checked(compact, "full")  # --verify full: every shard
    assert hashed == ["shard-00000.parquet", "shard-00001.parquet"]
    hashed.clear()
    before = shard.stat()
    flip_in_column(shard, "topk_ids")  # in place, same size, and the mtime put back: the ctime still moves
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(KdpipeError, match="shard-00001.parquet: sha256 checksum mismatch"):
        open_checked(compact)
    assert hashed == ["shard-00001.parquet"]
    assert set(json.loads((compact / RECORD).read_text())["shards"]) == {"shard-00000.parquet"}


def test_fast_verification_still_checks_sizes_and_the_manifest(compact, hashed):
    from kdpipe.cache.tools import open_checked

    open_checked(compact)
    shard = compact / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(KdpipeError, match="shard-00000.parquet: size"):
        open_checked(compact)
    shard.write_bytes(shard.read_bytes()[:-1])
    manifest = json.loads((compact / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # the record's sha256 no longer the manifest's: hashed again
    (compact / "manifest.json").write_text(json.dumps(manifest))
    hashed.clear()
    with pytest.raises(KdpipeError, match="shard-00001.parquet: sha256 checksum mismatch"):
        open_checked(compact)


def test_the_record_is_not_a_cache_file(compact, tiny_model_dir, tmp_path):
    """cache-teacher (resume, --overwrite) and cache merge ignore the verification record."""
    from kdpipe.cache.tools import open_checked
    from kdpipe.cache.verified import RECORD

    open_checked(compact)
    assert (compact / RECORD).exists()
    args = ("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 20,
            "--rows-per-shard", 10, "--encoding", "compact", "--cache", compact)
    kdpipe(*args, "--top-k", 4)  # the same run: nothing to do, the record stays
    assert kdpipe("cache", "verify", compact).output.startswith("ok ")
    (compact / "manifest.json").unlink()
    for name in ("shard-00000.parquet", "shard-00001.parquet"):
        (compact / name).unlink()
    kdpipe(*args, "--top-k", 3)  # only the record left: an empty folder to cache-teacher
    assert kdpipe("cache", "verify", compact).output.startswith("ok ")
    open_checked(compact)
    kdpipe(*args, "--top-k", 2, "--overwrite")  # --overwrite removes the record with the shards
    assert not (compact / RECORD).exists()
    open_checked(compact)
    out = tmp_path / "merged"
    out.mkdir()
    (out / RECORD).write_text("{}")
    kdpipe("cache", "merge", compact, "--output", out)
    assert kdpipe("cache", "verify", out).output.startswith("ok ")


def test_verify_option_of_train_student_and_evaluate():
    from kdpipe.stages.evaluate import EvaluateConfig
    from kdpipe.stages.train_student import TrainStudentConfig

    assert TrainStudentConfig().verify == "fast" and EvaluateConfig().verify == "fast"
    assert TrainStudentConfig(verify="full").verify == "full"
    assert "--verify [fast|full]" in kdpipe("train-student", "--help").output
