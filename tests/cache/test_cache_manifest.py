"""The typed manifest (kdpipe.cache.manifest) changes nothing on disk: manifest.json read and written back
is the same bytes, and the settings hash is the one kdpipe always computed, for current caches and for
older manifests that lack keys added since."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from helpers import kdpipe

from kdpipe.cache.manifest import MANIFEST, Manifest
from kdpipe.cache.sections import SparseMode
from kdpipe.errors import KdpipeError


@pytest.fixture(scope="module", params=["topk-plain", "sampled-compact"])
def cache(request, tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("m") / request.param
    sampled = ["--sparse-mode", "sampled", "--samples", 6, "--encoding", "compact"]
    extra = sampled if "sampled" in request.param else ["--top-k", 8]
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 30,
           "--cache", folder, "--rows-per-shard", 16, "--dtype", "fp32", *extra)
    return folder


def reference_hash(manifest: dict) -> str:
    """The settings hash as stage one computed it before the manifest was typed (kept here verbatim)."""
    keys = ("teacher", "tokenizer", "template", "dataset", "sparse", "encoding")
    content = {key: manifest[key] for key in keys}
    content["teacher"] = {k: v for k, v in content["teacher"].items() if k != "backend_version"}
    content["dataset"] = {k: v for k, v in content["dataset"].items()
                          if k not in ("examples", "report", "heldout", "file")}
    content["rows_per_shard"] = manifest["sharding"]["rows_per_shard"]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def test_a_current_manifest_round_trips_byte_for_byte(cache, tmp_path):
    raw = (cache / MANIFEST).read_bytes()
    m = Manifest.read(cache)
    assert m.to_json() == raw
    m.write(tmp_path)
    assert (tmp_path / MANIFEST).read_bytes() == raw
    data = json.loads(raw)
    assert m.settings_hash == m.compute_settings_hash() == reference_hash(data) == data["settings_hash"]
    assert m.sparse.mode is (SparseMode.SAMPLED if "sampled" in cache.name else SparseMode.TOPK)
    assert [s.file for s in m.shards] == [s["file"] for s in data["shards"]]


def test_an_older_manifest_lacking_keys_round_trips_unchanged(cache, tmp_path):
    """Keys added over time (shard ids_sha256 and stats, dataset heldout and file, teacher backend) stay
    absent when written back, unknown keys stay where they were, and the hash follows the old formula."""
    data = json.loads((cache / MANIFEST).read_text())
    old = copy.deepcopy(data)
    for shard in old["shards"]:
        shard.pop("ids_sha256", None)
        shard.pop("stats", None)
    for key in ("heldout", "file"):
        old["dataset"].pop(key, None)
    for key in ("backend", "backend_version"):
        old["teacher"].pop(key, None)
    old.pop("created")
    old["sparse"]["future_knob"] = 3  # a key this kdpipe does not know: kept, in place
    old["note"] = "written by hand"
    folder = tmp_path / "old"
    folder.mkdir()
    raw = (json.dumps(old, indent=2) + "\n").encode()
    (folder / MANIFEST).write_bytes(raw)
    m = Manifest.read(folder)
    assert m.to_json() == raw
    assert m.shards[0].ids_sha256 is None and m.dataset.heldout is None and m.teacher.backend is None
    m.write(folder)
    assert (folder / MANIFEST).read_bytes() == raw
    assert m.compute_settings_hash() == reference_hash(old)
    again = m.with_shards(m.shards, complete=m.complete)  # what a resume does: totals recounted, same bytes
    assert again.to_json() == raw


def test_an_unknown_sparse_mode_is_a_clear_error(cache, tmp_path):
    data = json.loads((cache / MANIFEST).read_text())
    data["sparse"]["mode"] = "beam"
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KdpipeError, match="unknown sparse mode 'beam' in a cache manifest"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("name", ["cache-plain", "cache-compact"])
def test_the_previous_versions_manifests_round_trip(name, tmp_path):
    """The caches written by the previous version (tests/assets/v0): same bytes back, same settings hash."""
    folder = Path(__file__).parents[1] / "assets" / "v0" / name
    raw = (folder / MANIFEST).read_bytes()
    m = Manifest.read(folder)
    m.write(tmp_path)
    assert (tmp_path / MANIFEST).read_bytes() == raw
    assert m.compute_settings_hash() == m.settings_hash == reference_hash(json.loads(raw))
