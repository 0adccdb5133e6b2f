"""Caches on object storage: cache-teacher, resume, verify, merge and train-student against a real
S3-compatible server (moto's server mode on 127.0.0.1, spoken to over HTTP by pyarrow's S3 client)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import kdpipe

from kdpipe.cache.manifest import read_manifest
from kdpipe.cache.storage import Store
from kdpipe.errors import KdpipeError

K = 8
BUCKET = "kdpipe-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a random loopback port, with the AWS_* variables pointing at it; yields the bucket URL.

    The server runs in its own process: moto's server is a Flask app, and Flask's proxies in this
    process's modules break vLLM's start-up (it probes every module global) for the tests after these.
    """
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def cache_args(model: Path, cache: str, *extra: object) -> list[object]:
    return ["cache-teacher", "--model", model, "--dataset", "kdpipe:arithmetic", "--limit", 60, "--top-k", K,
            "--cache", cache, "--rows-per-shard", 25, "--batch-size", 7, "--dtype", "fp32", *extra]


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("local") / "arith"
    kdpipe(*cache_args(tiny_model_dir, str(folder)))
    return folder


def shard_bytes(location: str | Path) -> dict[str, bytes]:
    store = Store.open(location)
    return {s["file"]: store.read_bytes(s["file"]) for s in read_manifest(store)["shards"]}


def test_cache_on_s3_crash_resume_verify(s3, tiny_model_dir, local_cache, monkeypatch):
    """A crash between a shard's upload and the manifest update, then a resume: same bytes as a local run."""
    from kdpipe.cache import writer
    from kdpipe.teacher.hf import HFTeacher

    url = f"{s3}/runs/arith"
    real_record, scored = writer.CacheWriter._record, []

    def crash_after_second_upload(self, entry):
        if entry["index"] == 1:
            raise RuntimeError("simulated crash")  # shard-00001 is uploaded, the manifest does not list it
        return real_record(self, entry)

    monkeypatch.setattr(writer.CacheWriter, "_record", crash_after_second_upload)
    with pytest.raises(RuntimeError, match="simulated crash"):
        kdpipe(*cache_args(tiny_model_dir, url))
    partial, store = read_manifest(url), Store.open(url)
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [0]
    assert store.names() == ["manifest.json", "shard-00000.parquet", "shard-00001.parquet"]

    monkeypatch.setattr(writer.CacheWriter, "_record", real_record)
    real_score = HFTeacher.score
    monkeypatch.setattr(HFTeacher, "score", lambda self, batch: scored.extend(e.id for e in batch) or real_score(self, batch))
    kdpipe(*cache_args(tiny_model_dir, url))
    assert len(scored) == 10  # only shard 2 (rows 50..59) was scored again; shard 1 was adopted after checking it
    done = read_manifest(url)
    assert done["complete"] and done["totals"] == read_manifest(local_cache)["totals"]
    assert shard_bytes(url) == shard_bytes(local_cache)  # byte-for-byte what a local run writes

    result = kdpipe("cache", "verify", url)
    assert result.output.strip() == f"ok   {url}"
    info = kdpipe("cache", "info", url, "--json")
    assert '"examples": 60' in info.output and '"shards": "3 of 3"' in info.output


def test_verify_names_a_damaged_object(s3, local_cache):
    url = f"{s3}/damaged"
    kdpipe("cache", "merge", local_cache, "--output", url)  # local -> s3 copy
    assert kdpipe("cache", "verify", url).exit_code == 0
    store = Store.open(url)
    data = bytearray(store.read_bytes("shard-00001.parquet"))
    data[100] ^= 0xFF
    store.write_bytes("shard-00001.parquet", bytes(data))
    result = kdpipe("cache", "verify", url, ok=False)
    assert result.exit_code != 0
    assert f"FAIL {url}/shard-00001.parquet: sha256 checksum mismatch (the file is damaged)" in result.output


def test_split_parts_on_s3_merge_into_one_cache(s3, tiny_model_dir, local_cache):
    for i in (0, 1):
        kdpipe(*cache_args(tiny_model_dir, f"{s3}/split/part{i}", "--num-shards", 2, "--shard-index", i))
    assert Store.open(f"{s3}/split/part1").names() == ["manifest.json", "shard-00001.parquet"]
    kdpipe("cache", "merge", f"{s3}/split/part0", f"{s3}/split/part1", "--output", f"{s3}/split/all")
    merged = read_manifest(f"{s3}/split/all")
    assert merged["complete"] and merged["sharding"]["num_shards"] == 1
    assert shard_bytes(f"{s3}/split/all") == shard_bytes(local_cache)
    result = kdpipe("cache", "merge", f"{s3}/split/part0", f"{s3}/split/part1", "--output", f"{s3}/split/all", ok=False)
    assert f"{s3}/split/all is not empty; merge into a new folder" in result.output


def test_train_student_reads_the_s3_cache(s3, tiny_model_dir, local_cache, tmp_path):
    """Training on the S3 copy of a cache logs exactly the losses of training on the local folder."""
    import json

    url = f"{s3}/train"
    kdpipe("cache", "merge", local_cache, "--output", url)
    common = ["--model", tiny_model_dir, "--max-steps", 3, "--batch-size", 8, "--logging-steps", 1, "--lr", "1e-3",
              "--seed", 0, "--shuffle-window", 1]
    kdpipe("train-student", "--cache", url, "--output", tmp_path / "s3run", *common)
    kdpipe("train-student", "--cache", local_cache, "--output", tmp_path / "localrun", *common)

    def losses(run: Path) -> list[float]:
        history = json.loads((run / "kdpipe_run.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    assert len(losses(tmp_path / "s3run")) == 3
    assert losses(tmp_path / "s3run") == losses(tmp_path / "localrun")


def test_an_s3_cache_longer_than_the_students_context_is_refused(s3, local_cache, tiny_tokenizer, tmp_path):
    """The context check reads the S3 shards through the cache's store (it once opened `path / file`
    with pyarrow directly: a TypeError on a URL) and names the cache and --max-length."""
    from kdpipe import tiny
    from kdpipe.cache.reader import open_cache

    url = f"{s3}/long"
    kdpipe("cache", "merge", local_cache, "--output", url)
    short = tmp_path / "short"
    tiny.init_model(short, tiny_tokenizer, max_position_embeddings=16, seed=1)
    longest = max(len(e.input_ids) for e in open_cache(local_cache).iter_examples())
    assert longest > 16 and open_cache(url).longest_example() == longest
    result = kdpipe("train-student", "--cache", url, "--model", short, "--output", tmp_path / "r", ok=False)
    assert result.exit_code != 0
    assert (f"cache {url} holds examples of up to {longest} tokens, longer than the student {short}'s context "
            "(16 tokens); cache the data again with --max-length 16") in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def test_missing_bucket_is_a_clear_error(s3, tiny_model_dir):
    result = kdpipe("cache", "verify", "s3://no-such-bucket-kdpipe/x", ok=False)
    assert result.exit_code != 0
    assert "s3://no-such-bucket-kdpipe/x is not a kdpipe cache: manifest.json is missing" in result.output


def test_two_parts_in_one_folder_are_refused_with_the_way_out(s3, tiny_model_dir):
    url = f"{s3}/one-folder"
    kdpipe(*cache_args(tiny_model_dir, url, "--num-shards", 2, "--shard-index", 0))
    result = kdpipe(*cache_args(tiny_model_dir, url, "--num-shards", 2, "--shard-index", 1), ok=False)
    assert result.exit_code != 0
    assert f"{url} holds part 0 of 2 of this run: each --shard-index writes its own folder" in result.output
    assert Store.open(url).names() == ["manifest.json", "shard-00000.parquet", "shard-00002.parquet"]  # part 0 untouched


def test_evaluate_fidelity_on_the_s3_cache(s3, tiny_model_dir, local_cache, tmp_path):
    import json

    url = f"{s3}/eval"
    kdpipe("cache", "merge", local_cache, "--output", url)
    results = {}
    for name, cache in (("s3", url), ("local", local_cache)):
        kdpipe("evaluate", "--model", tiny_model_dir, "--cache", cache, "--output", tmp_path / name)
        results[name] = json.loads((tmp_path / name / "results.json").read_text())["models"][0]["metrics"]
    assert results["s3"]["fidelity/top1_agreement"] == 1.0  # the teacher against its own cache
    assert results["s3"] == results["local"]


def test_any_fsspec_url_through_pyarrow(tiny_model_dir, local_cache):
    """A protocol pyarrow has no filesystem for (fsspec's in-memory one) goes through fsspec's handler."""
    url = "memory://kdpipe-test/arith"
    kdpipe("cache", "merge", local_cache, "--output", url)
    assert Store.open(url).local is False and shard_bytes(url) == shard_bytes(local_cache)
    assert kdpipe("cache", "verify", url).output.strip() == f"ok   {url}"
    from kdpipe.cache import open_cache

    assert [e.id for e in open_cache(url).iter_examples()] == [e.id for e in open_cache(local_cache).iter_examples()]


def test_a_second_writer_on_the_same_prefix_stops_the_first(s3, tiny_model_dir, local_cache):
    """No lock on S3: the last writer to start owns the prefix, the earlier one stops before its next manifest."""
    import pyarrow.parquet as pq

    from kdpipe.cache.writer import CacheWriter

    url = f"{s3}/two-writers"
    manifest = read_manifest(local_cache)
    header = {k: v for k, v in manifest.items() if k not in ("shards", "totals", "complete")}
    table = pq.read_table(local_cache / "shard-00000.parquet")
    with CacheWriter(url, header, [0, 1, 2]) as first:
        assert ".writer" in Store.open(url).names()
        with CacheWriter(url, header, [0, 1, 2]) as second:
            with pytest.raises(KdpipeError, match="another kdpipe process started writing .*this one stops: one writer per prefix"):
                first.write(0, table)
            entry = second.write(0, table)
        assert read_manifest(url)["shards"] == [entry]
    assert Store.open(url).names() == ["manifest.json", "shard-00000.parquet"]  # the marker is gone with its owner


def _run_on(cache: str, model: Path, folder: Path) -> Path:
    """A finished train-student run folder (the model itself as the student) that trained on `cache`."""
    import json
    import shutil

    shutil.copytree(model, folder)
    record = {"kind": "train-student", "status": "complete", "updated": "2030-01-01T00:00:00",
              "config": {"model": str(model), "cache": cache}}
    (folder / "kdpipe_run.json").write_text(json.dumps(record))
    return folder


def test_evaluate_infers_data_and_teacher_from_a_run_on_an_s3_cache(s3, tiny_model_dir, local_cache, workdir):
    """No --model, no --dataset: the latest run's data and teacher come from its cache's manifest on S3."""
    import json

    url = f"{s3}/run-data"
    kdpipe("cache", "merge", local_cache, "--output", url)
    run = _run_on(url, tiny_model_dir, workdir / "runs" / "distilled")
    result = kdpipe("evaluate", "--limit", 4, "--no-plot")
    assert "data: kdpipe:arithmetic split=test" in result.output
    data = json.loads((run / "eval" / "results.json").read_text())
    assert [m["role"] for m in data["models"]] == ["student", "base", "teacher"]
    assert data["models"][2]["source"] == str(tiny_model_dir)  # the teacher named in the S3 manifest
    assert data["data"]["dataset"] == "kdpipe:arithmetic" and data["data"]["tasks"] == ["exact-match", "perplexity"]


def test_evaluate_fidelity_of_a_run_on_an_s3_cache(s3, tiny_model_dir, local_cache, tmp_path):
    """A run trained on an S3 cache, its fidelity on that cache: the data comes from the S3 manifest and the
    overlap with the training cache is noted."""
    import json

    url = f"{s3}/run-fidelity"
    kdpipe("cache", "merge", local_cache, "--output", url)
    run = _run_on(url, tiny_model_dir, tmp_path / "run")
    result = kdpipe("evaluate", "--model", run, "--cache", url, "--limit", 4, "--output", tmp_path / "eval")
    assert f"60 of the 60 examples of cache {url} are also in {url}" in result.output
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["models"][0]["metrics"]
    assert metrics["fidelity/top1_agreement"] == 1.0 and "exact-match/exact_match" in metrics
