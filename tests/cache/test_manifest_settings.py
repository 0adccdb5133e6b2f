"""`cache verify` holds every manifest field that shapes the data (k, mode, encoding, vocabulary) against the
shards' own metadata and the recomputed settings hash (issue 29, item 4). Before the fix a manifest claiming
another top-k passed verify and `cache info`, then train-student died in the loss with a tensor-size
RuntimeError and left its run folder "running"."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import expect_error, run_cli

from kdpipe.cache.manifest import Manifest

EDITS = {  # field of manifest.json -> (its edited value, how the shards' metadata names it)
    "k": (("sparse", "k"), 4, "k=8 (the manifest says 4)"),
    "mode": (("sparse", "mode"), "sampled", "sparse_mode=topk (the manifest says sampled)"),
    "encoding": (("encoding",), "compact", "encoding=plain (the manifest says compact)"),
    "vocab": (("tokenizer", "vocab_hash"), "0" * 64, "vocab_hash=6"),
}


def edited(world, tmp_path, field: str, rehash: bool):
    cache = tmp_path / "cache"
    shutil.copytree(world.cache, cache)
    path, value, _ = EDITS[field]
    m = json.loads((cache / "manifest.json").read_text())
    section = m
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    if field == "mode":
        m["sparse"].update(samples=8, proposal_temperature=1.0)
    if rehash:  # a forger (or a tool) that also recomputed the hash: the shards' metadata still tell
        m["settings_hash"] = Manifest.from_dict(m).compute_settings_hash()
    (cache / "manifest.json").write_text(json.dumps(m, indent=2))
    return cache


@pytest.mark.parametrize("field", list(EDITS))
def test_a_manifest_that_claims_other_settings_fails_verify_info_and_train_student(world, tmp_path, field):
    cache, named = edited(world, tmp_path, field, rehash=False), EDITS[field][2]
    result = expect_error("cache", "verify", cache, match="its settings do not give its settings hash (a setting "
                                                          "was edited after the cache was written)")
    assert f"its shards' metadata says {named}" in result.output
    info = run_cli("cache", "info", cache).output
    assert "settings do not give its settings hash" in info and "kdpipe cache verify" in info
    out = tmp_path / "run"
    expect_error("train-student", "--cache", cache, "--model", world.student, "--output", out, "--max-steps", 1,
                 match="its settings do not give its settings hash")
    assert not out.exists()  # refused before the run folder was made: nothing left "running"


@pytest.mark.parametrize("field", ["k", "encoding"])
def test_a_rehashed_manifest_is_held_against_each_shards_metadata(world, tmp_path, field):
    cache, named = edited(world, tmp_path, field, rehash=True), EDITS[field][2]
    result = expect_error("cache", "verify", cache, match=f"shard-00000.parquet: its metadata says {named}")
    assert "shard-00002.parquet: its metadata says" in result.output
    assert "the manifest does not describe this shard" in result.output
    out = tmp_path / "run"
    expect_error("train-student", "--cache", cache, "--model", world.student, "--output", out, "--max-steps", 1,
                 match=f"its metadata says {named}")
    assert not out.exists()
