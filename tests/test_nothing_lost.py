"""Nothing lost, nothing silent (issue 14, the cache side): a shard proves which shard it is, verify checks
the listing against the totals, non-finite teacher values are refused where written and where read,
labels are validated, merge verifies its parts and survives a kill, a damaged manifest is rebuilt,
bad --cache and --dataset paths are named before the teacher loads, files honour the umask.

Every case is a real CLI run (in-process through click, or a `python -m kdpipe.cli` subprocess where a
kill or a dropped capability is needed) on the tiny test teacher.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import kdpipe, write_jsonl

from kdpipe.cache import open_cache
from kdpipe.cache.format import METADATA_KEY, read_manifest
from kdpipe.cache.tools import open_checked, verify
from kdpipe.cache.writer import shard_bytes, totals
from kdpipe.errors import KdpipeError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "KDPIPE_NO_PROGRESS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("KDPIPE_FAULT", None)


def args(model: Path, folder: Path, *extra: object) -> list[object]:
    """The cache-teacher command of these tests: 30 arithmetic examples in 3 shards of 10, k = 4."""
    return ["cache-teacher", "--model", model, "--dataset", "kdpipe:arithmetic", "--limit", 30, "--top-k", 4,
            "--rows-per-shard", 10, "--device", "cpu", "--cache", folder, *extra]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("lost") / "good"
    kdpipe(*args(tiny_model_dir, folder))
    return folder


@pytest.fixture
def cache(tmp_path, good) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(good, copy)
    return copy


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def save_manifest(folder: Path, m: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def shas(folder: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in read_manifest(folder)["shards"]]


def rewrite_shard(folder: Path, name: str, table: pa.Table, into: str | None = None) -> None:
    """Write `table` as the shard file `into` (default `name`) and make the manifest's size, sha256 and totals
    agree: what a hand-made shard looks like to every checksum."""
    import hashlib

    data = shard_bytes(table)
    (folder / (into or name)).write_bytes(data)
    m = manifest(folder)
    for s in m["shards"]:
        if s["file"] == (into or name):
            s.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=table.num_rows)
            s.pop("ids_sha256", None) if into else None
    m["totals"] = totals(m["shards"])
    save_manifest(folder, m)


def footer(table: pa.Table) -> dict:
    return json.loads(table.schema.metadata[METADATA_KEY])


# ---------------------------------------------------------------- 6: labels as evaluate reads them


def reviews(labels: list) -> list[dict]:
    texts = ["a great film, wonderful acting", "boring and far too long", "a terrible plot", "wonderful"]
    return [{"text": t, "label": label} for t, label in zip(texts, labels)]


def cache_reviews(tmp_path: Path, model: Path, name: str, labels: list, ok: bool = True):
    data = write_jsonl(tmp_path / f"{name}.jsonl", reviews(labels))
    return kdpipe("cache-teacher", "--model", model, "--dataset", data, "--template", "sentiment", "--top-k", 4,
                  "--cache", tmp_path / name, ok=ok)


def test_integral_float_labels_are_their_names(tmp_path, tiny_model_dir):
    cache_reviews(tmp_path, tiny_model_dir, "ints", [1, 0, 0, 1])
    cache_reviews(tmp_path, tiny_model_dir, "floats", [1.0, 0.0, "negative", 1.0])
    ints, floats = (list(open_cache(tmp_path / n).iter_examples()) for n in ("ints", "floats"))
    for a, b in zip(ints, floats):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize("label, message", [
    ("neutral", "example 'train-2' has the label 'neutral', which is not among the label names ['negative', 'positive']; "
                "pass --label-names covering every label of the data"),
    (0.5, "example 'train-2': label 0.5 is neither an integer nor a name"),
    (2, "example 'train-2': label 2 has no name; label_names are ['negative', 'positive']"),
])
def test_a_label_outside_the_label_names_is_refused(tmp_path, tiny_model_dir, label, message):
    result = cache_reviews(tmp_path, tiny_model_dir, "bad", [1, 0, label, 1], ok=False)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- 7: merge


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("parts")
    for i in range(2):
        kdpipe(*args(tiny_model_dir, root / f"part{i}", "--num-shards", 2, "--shard-index", i))
    return root


def test_merge_refuses_a_damaged_part(parts, tmp_path):
    damaged = tmp_path / "part1"
    shutil.copytree(parts / "part1", damaged)
    data = bytearray((damaged / "shard-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "shard-00001.parquet").write_bytes(bytes(data))
    result = kdpipe("cache", "merge", parts / "part0", damaged, "--output", tmp_path / "merged", ok=False)
    assert result.exit_code == 2
    assert "cannot merge, a part is damaged: " in result.output
    assert "part1/shard-00001.parquet: sha256 checksum mismatch" in result.output
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_a_killed_merge_is_rerunnable(parts, good, tmp_path):
    out = tmp_path / "merged"
    merge = [sys.executable, "-m", "kdpipe.cli", "cache", "merge", str(parts / "part0"), str(parts / "part1"),
             "--output", str(out)]
    killed = subprocess.run(merge, env={**ENV, "KDPIPE_FAULT": "mid-write:manifest.json"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "manifest.json").exists() and list(out.glob(".manifest.json.*.tmp"))  # the torn temp manifest
    kdpipe("cache", "merge", parts / "part0", parts / "part1", "--output", out)
    assert shas(out) == shas(good) and verify(out) == []
    assert not list(out.glob(".*.tmp"))
    again = kdpipe("cache", "merge", parts / "part0", parts / "part1", "--output", out, ok=False)  # a finished merge
    assert f"{out} is not empty; merge into a new folder" in again.output


# ---------------------------------------------------------------- 9: a bad --cache, named before the teacher loads


@pytest.fixture(scope="module")
def unloadable_teacher(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny teacher with truncated weights: its tokenizer and config load, the model does not. A check
    that ran after the model load would report the weights instead."""
    folder = tmp_path_factory.mktemp("models") / "torn"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def test_cache_path_that_is_a_file_is_named_before_the_teacher_loads(tmp_path, unloadable_teacher):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for target, message in ((file, f"--cache {file} is a file, not a folder"),
                            (file / "sub", f"--cache {file / 'sub'} runs through the file {file}, not a folder")):
        result = kdpipe(*args(unloadable_teacher, target), ok=False)
        assert result.exit_code == 2 and message in result.output, result.output
    assert file.read_text() == "mine"


def test_read_only_cache_folder_is_named_before_the_teacher_loads(tmp_path, unloadable_teacher):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    # root writes anywhere: drop the capability that lets it, as an ordinary user runs
    prefix = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    for target, where in ((folder / "new", f" (it would be made inside {folder})"),):  # one run: torch imports are slow
        result = subprocess.run([*prefix, sys.executable, "-m", "kdpipe.cli", *map(str, args(unloadable_teacher, target))],
                                env=ENV, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert f"--cache {target} cannot be written{where}: Permission denied; choose a folder you can write to" in result.stderr
    assert not any(folder.iterdir())


# ---------------------------------------------------------------- 12: empty files and folders as --dataset


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.parquet"])
def test_zero_byte_dataset_file(tmp_path, tiny_model_dir, name):
    (tmp_path / name).write_bytes(b"")
    result = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", tmp_path / name, "--cache", tmp_path / "c",
                    ok=False)
    assert result.exit_code == 2
    assert f"dataset file {tmp_path / name} is empty (0 bytes); it needs at least one example" in result.output
    assert not (tmp_path / "c").exists()


def test_blank_jsonl_and_a_directory_as_dataset(tmp_path, tiny_model_dir):
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "data").mkdir()
    for dataset, message in ((tmp_path / "blank.jsonl", "holds no example (only blank lines)"),
                             (tmp_path / "data", f"dataset {tmp_path / 'data'} is a directory; --dataset takes one "
                                                 ".jsonl/.json/.csv/.parquet file")):
        result = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", dataset, "--cache", tmp_path / "c", ok=False)
        assert result.exit_code == 2 and message in result.output, result.output


# ---------------------------------------------------------------- 15: the umask


def test_written_files_honour_the_umask(tmp_path, tiny_model_dir):
    from kdpipe import training

    old = os.umask(0o027)
    try:
        kdpipe(*args(tiny_model_dir, tmp_path / "c", "--limit", 10))
        training._write_run(tmp_path / "kdpipe_run.json", {"status": "complete"})  # the run record's writer
    finally:
        os.umask(old)
    files = [tmp_path / "c" / "manifest.json", tmp_path / "c" / "shard-00000.parquet", tmp_path / "kdpipe_run.json"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}
