"""Fault injection: real `kdpipe` processes killed with SIGKILL (at exact points and at seeded random
points), damaged shards and manifests, a disk that fills up, two writers on one folder.

Every run is a subprocess (`python -m kdpipe.cli`) with one torch thread, so the numbers of a
resumed cache are bit-for-bit those of the uninterrupted reference run. Exact points come from the
`KDPIPE_FAULT` test hook (kdpipe.faults); random points are seeded delays after a seeded amount of progress.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kdpipe, run_cli, write_jsonl

from kdpipe.cache import open_cache
from kdpipe.cache.commands import verify
from kdpipe.cache.manifest import read_manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "KDPIPE_NO_PROGRESS": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("KDPIPE_FAULT", None)
TOTAL = 24  # shards of the cache below: 240 examples, 10 per shard
KILLED = -signal.SIGKILL


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "kdpipe.cli", *map(str, args)]


def start(*args: object, fault: str | None = None, **popen) -> subprocess.Popen:
    env = {**ENV, "KDPIPE_FAULT": fault} if fault else ENV
    return subprocess.Popen(command(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def run(*args: object, fault: str | None = None, **popen) -> tuple[int, str]:
    return finish(start(*args, fault=fault, **popen))


def kill_when(process: subprocess.Popen, reached: Callable[[], bool], delay: float) -> None:
    """SIGKILL `process` `delay` seconds after `reached()` first holds (it must still be running then)."""
    while not reached():
        assert process.poll() is None, finish(process)[1]
        time.sleep(0.002)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before its kill point"
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == KILLED


def cache_args(model: Path, folder: Path) -> tuple[object, ...]:
    return ("cache-teacher", "--model", model, "--dataset", "kdpipe:arithmetic", "--limit", 240, "--top-k", 4,
            "--rows-per-shard", 10, "--device", "cpu", "--cache", folder)


def recorded(folder: Path) -> list[int]:
    return [s["index"] for s in read_manifest(folder)["shards"]]


def only_incomplete(folder: Path) -> None:
    """Every recorded shard is intact: the one problem `verify` finds is that shards are still to be written."""
    problems = verify(folder)
    assert len(problems) == 1 and "incomplete" in problems[0], problems


def assert_same_cache(folder: Path, reference: Path) -> None:
    """Same shards byte for byte, same rows and values, no duplicate or missing id, nothing left over."""
    assert verify(folder) == []
    got, want = read_manifest(folder), read_manifest(reference)
    assert got["complete"]
    assert [(s["file"], s["rows"], s["sha256"]) for s in got["shards"]] == [(s["file"], s["rows"], s["sha256"]) for s in want["shards"]]
    rows, ref_rows = list(open_cache(folder).iter_examples()), list(open_cache(reference).iter_examples())
    ids = [r.id for r in rows]
    assert ids == [r.id for r in ref_rows] and len(set(ids)) == len(ids) == 240
    for a, b in zip(rows, ref_rows):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.targets.topk_ids, b.targets.topk_ids)
        np.testing.assert_array_equal(a.targets.topk_logprobs, b.targets.topk_logprobs)
        np.testing.assert_array_equal(a.targets.tail_mass, b.targets.tail_mass)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Iterator[Callable[[], Path]]:
    """The uninterrupted cache every damaged or killed run must end up equal to. It is written beside
    the first test's runs (CI has 2 cores); calling the fixture's value waits for it."""
    folder = tmp_path_factory.mktemp("faults") / "reference"
    process = start(*cache_args(tiny_model_dir, folder))

    def done() -> Path:
        if process.returncode is None:
            code, output = finish(process)
            assert code == 0, output
            assert len(recorded(folder)) == TOTAL
        return folder

    yield done
    if process.returncode is None:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- cache-teacher killed, then rerun


def test_kills_at_exact_points_then_resume(reference, tiny_model_dir, tmp_path):
    """Killed mid-shard-write, between a shard's rename and its manifest entry (a second writer refused by the
    lock meanwhile) and mid-manifest-write; each rerun resumes, the last one ends equal to the reference."""
    folder, args = tmp_path / "c", cache_args(tiny_model_dir, tmp_path / "c")

    code, output = run(*args, fault="mid-write:shard-00002.parquet")  # half of shard 2 in its temp file
    assert code == KILLED, output
    assert recorded(folder) == [0, 1] and not (folder / "shard-00002.parquet").exists()
    (tmp,) = folder.glob(".shard-00002.parquet.*.tmp")
    half = tmp.stat().st_size
    only_incomplete(folder)

    # shard 5 in place, not yet in the manifest: frozen there (lock held) while a second writer is refused, then killed
    first = start(*args, fault="renamed:shard-00005.parquet:1:STOP")
    try:
        while _state(first.pid) != "T":
            assert first.poll() is None, finish(first)[1]
            time.sleep(0.01)
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        code, output = run(*args)
        assert code == 2 and f"another kdpipe process is writing to {folder} (its .lock is held)" in output, output
        assert "Traceback" not in output
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGKILL)
    assert finish(first)[0] == KILLED
    assert recorded(folder) == [0, 1, 2, 3, 4] and (folder / "shard-00005.parquet").is_file()
    assert not list(folder.glob(".*.tmp")), "the rerun cleared the torn temp file"
    only_incomplete(folder)

    # manifest writes of this run: 1 at start-up (adopting shard 5), 2 after shard 6: killed half-way through it
    code, output = run(*args, fault="mid-write:manifest.json:2")
    assert code == KILLED, output
    assert recorded(folder) == [0, 1, 2, 3, 4, 5] and (folder / "shard-00006.parquet").is_file()
    assert len(list(folder.glob(".manifest.json.*.tmp"))) == 1  # the torn manifest never replaced the good one
    only_incomplete(folder)

    code, output = run(*args)
    assert code == 0, output
    assert_same_cache(folder, reference())
    assert half == (folder / "shard-00002.parquet").stat().st_size // 2  # the kill came half-way through the shard
    assert kdpipe("cache", "verify", folder).output.startswith("ok ")


def test_kills_at_random_points_then_resume(reference, tiny_model_dir, tmp_path):
    """Seeded random points: after a random number of shards, a random delay (scoring, encoding or writing)."""
    folder, args = tmp_path / "c", cache_args(tiny_model_dir, tmp_path / "c")
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        before = len(recorded(folder)) if (folder / "manifest.json").exists() else 0
        target, delay = rng.randint(before, max(before, min(before + 5, TOTAL - 6))), rng.uniform(0.0, 0.05)
        kill_when(start(*args), lambda: (folder / "manifest.json").exists() and len(recorded(folder)) >= target, delay)  # noqa: B023 polled within this iteration
        assert target <= len(recorded(folder)) < TOTAL, seed
        only_incomplete(folder)
    code, output = run(*args)
    assert code == 0, output
    assert_same_cache(folder, reference())


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# ---------------------------------------------------------------- damaged caches


def test_damaged_shards_are_named_refused_and_rewritten(reference, tiny_model_dir, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(reference(), folder)
    truncated, flipped, missing = (folder / f"shard-{i:05d}.parquet" for i in (3, 7, 11))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    missing.unlink()
    good = {p.name: p.stat().st_ino for p in folder.glob("shard-*.parquet") if p not in (truncated, flipped)}

    result = kdpipe("cache", "verify", folder, ok=False)
    assert result.exit_code == 2
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert failures == [
        f"FAIL {truncated}: size {truncated.stat().st_size} bytes, the manifest says {truncated.stat().st_size + 100} (truncated or replaced)",
        f"FAIL {flipped}: sha256 checksum mismatch (the file is damaged)",
        f"FAIL {missing}: missing",
    ]
    student = ("train-student", "--cache", folder, "--model", tiny_model_dir, "--output", tmp_path / "run")
    result = kdpipe(*student, ok=False)
    assert result.exit_code == 2 and f"cache {folder} failed verification: {truncated}: size" in result.output
    assert not (tmp_path / "run").exists()
    result = kdpipe("evaluate", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 4,
                    "--cache", folder, "--output", tmp_path / "eval", ok=False)
    assert result.exit_code == 2 and f"{flipped}: sha256 checksum mismatch" in result.output
    assert not (tmp_path / "eval" / "results.json").exists()

    code, output = run(*cache_args(tiny_model_dir, folder))  # the same command repairs exactly the damaged shards
    assert code == 0, output
    assert "note: shard-00003.parquet, shard-00007.parquet, shard-00011.parquet missing or damaged" in output
    assert {p.name: p.stat().st_ino for p in folder.glob("shard-*.parquet") if p.name in good} == good
    assert_same_cache(folder, reference())


def test_manifest_of_another_run(reference, tiny_model_dir, tmp_path):
    other, folder = tmp_path / "other", tmp_path / "c"
    kdpipe(*cache_args(tiny_model_dir, other)[:-1], other, "--split", "test", "--limit", 20)
    shutil.copytree(reference(), folder)
    shutil.copy(other / "manifest.json", folder / "manifest.json")
    before = {p.name: p.read_bytes() for p in folder.glob("shard-*.parquet")}
    problems = verify(folder)
    assert problems == [f"{folder / f'shard-0000{i}.parquet'}: belongs to another run than {folder / 'manifest.json'} "
                        "(settings hash differs): the shard or the manifest was replaced" for i in (0, 1)]
    result = kdpipe(*cache_args(tiny_model_dir, folder), ok=False)
    assert result.exit_code == 2 and f"{folder} holds another run (different dataset" in result.output
    assert {p.name: p.read_bytes() for p in folder.glob("shard-*.parquet")} == before  # nothing rewritten


def small_disk(limit: int) -> None:
    """In the child: files may not grow beyond `limit` bytes (write() fails with EFBIG, as on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a fatal signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_disk_full_mid_write_keeps_the_finished_shards(tiny_model_dir, tmp_path):
    """A file size limit (RLIMIT_FSIZE, EFBIG) stands in for a full disk: shard 2 does not fit, 0 and 1 do."""
    words = "the quick brown fox jumps over the lazy dog and a great film".split()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(words, k=3 if i < 20 else 400))} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    folder = tmp_path / "c"
    args = ("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--template", "text", "--top-k", 8,
            "--rows-per-shard", 10, "--device", "cpu", "--cache", folder)
    limit = 40_000
    code, output = run(*args, preexec_fn=lambda: small_disk(limit))
    assert code == 2, output
    assert (f"cannot write {folder / 'shard-00002.parquet'}: File too large (the disk is full or a file size limit "
            "was reached). Free some space and rerun the same command: what was finished is kept") in output
    assert "Traceback" not in output
    assert recorded(folder) == [0, 1] and not list(folder.glob(".*.tmp"))
    only_incomplete(folder)
    kept = {p.name: p.read_bytes() for p in folder.glob("shard-*.parquet")}
    assert max(len(b) for b in kept.values()) < limit

    kdpipe(*args)  # space is back: the same command resumes
    assert verify(folder) == [] and {n: (folder / n).read_bytes() for n in kept} == kept
    assert read_manifest(folder)["shards"][2]["bytes"] > limit  # the limit really was what stopped it
    assert [e.id for e in open_cache(folder).iter_examples()] == [f"train-{i}" for i in range(30)]


# ---------------------------------------------------------------- train-student killed, then --resume


def train_args(cache: Path, student: Path, out: Path) -> tuple[object, ...]:
    # 240 rows in batches of 16: 15 steps per epoch, so the run crosses an epoch boundary
    return ("train-student", "--cache", cache, "--model", student, "--output", out, "--full", "--max-steps", 20,
            "--batch-size", 16, "--lr", "3e-3", "--save-steps", 3, "--save-total-limit", 2, "--logging-steps", 1,
            "--lr-scheduler", "linear", "--warmup", 2, "--seed", 7, "--shuffle-window", 2)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_tokenizer) -> Path:
    from kdpipe import tiny

    path = tmp_path_factory.mktemp("faults") / "student"
    tiny.init_model(path, tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=3)
    return path


def test_train_student_killed_then_resumed_matches_an_uninterrupted_run(reference, student, tmp_path):
    from transformers import AutoModelForCausalLM

    cache, straight, out = reference(), tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start(*train_args(cache, student, straight))  # beside the killed runs (CI has 2 cores)
    for seed in (1, 2):  # each kill lands a seeded number of checkpoints after the last one, plus a seeded delay
        rng = random.Random(seed)
        latest = max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0)
        target, delay = min(latest + 3 * rng.randint(1, 2), 15), rng.uniform(0.0, 0.08)
        process = start(*train_args(cache, student, out), *(["--resume"] if latest else []))
        kill_when(process, lambda: (out / f"checkpoint-{target}" / "trainer_state.json").exists(), delay)  # noqa: B023 polled within this iteration
        assert json.loads((out / "kdpipe_run.json").read_text())["status"] == "running"
    code, output = run(*train_args(cache, student, out), "--resume")
    assert code == 0, output
    code, output = finish(uninterrupted)
    assert code == 0, output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["global_step"] == 20 and len(record["resumed_from"]) == 2
    a = AutoModelForCausalLM.from_pretrained(str(straight), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
    base = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    assert not torch.allclose(a.lm_head.weight, base.lm_head.weight, atol=1e-4)  # it trained
    losses = lambda folder: [h["loss"] for h in json.loads((folder / "kdpipe_run.json").read_text())["log_history"] if "loss" in h]  # noqa: E731
    np.testing.assert_allclose(losses(out)[-3:], losses(straight)[-3:], rtol=1e-5)  # same batches after the last resume


def test_torn_checkpoint_is_not_resumed_from(tmp_path):
    """A kill while Trainer writes trainer_state.json (its last file) leaves a checkpoint that is skipped."""
    from kdpipe.run_folder import last_checkpoint

    for step, state in ((3, '{"global_step": 3}'), (6, '{"global_step": 6}'), (9, '{"global_st'), (12, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


def test_train_student_disk_full_then_resume(reference, student, tmp_path):
    """The first checkpoint's optimizer state does not fit: a message naming the checkpoint, then --resume starts over."""
    out = tmp_path / "run"
    args = ("train-student", "--cache", reference(), "--model", student, "--output", out, "--full", "--max-steps", 4,
            "--save-steps", 2, "--batch-size", 8)
    code, output = run(*args, preexec_fn=lambda: small_disk(250_000))
    assert code == 2, output
    assert f"could not write {out / 'checkpoint-2'} (" in output and (
        "); is the disk full? Free some space and rerun with --resume: training continues from the last complete "
        "checkpoint") in output
    assert "Traceback" not in output
    # stopped by an error it reported: "failed", as a run stopped by bad data (issue 29 item 11), not "running"
    assert json.loads((out / "kdpipe_run.json").read_text())["status"] == "failed"
    kdpipe(*args, "--resume")  # space is back; no complete checkpoint was left, so the run starts over
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["global_step"] == 4 and "resumed_from" not in record


def test_final_save_on_a_full_disk_is_a_message_and_a_failed_run(reference, student, tmp_path, monkeypatch):
    """The model does not fit at the end (safetensors reports a full disk as its own SafetensorError, not an
    OSError: it was a traceback): a message, the run marked failed, and --resume saves the last step's
    checkpoint without training again."""
    from safetensors import SafetensorError

    from kdpipe.train import trainer

    real, calls = trainer._save, []

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_save", full_once)
    out = tmp_path / "run"
    args = ("train-student", "--cache", reference(), "--model", student, "--output", out, "--full", "--max-steps", 2,
            "--batch-size", 8)
    result = run_cli(*args, ok=False)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    assert f"could not write {out} (Error while serializing: I/O error: No space left on device" in result.output
    assert "is the disk full? Free some space and rerun with --resume" in result.output
    assert json.loads((out / "kdpipe_run.json").read_text())["status"] == "failed"
    assert (out / "checkpoint-2").is_dir()  # Trainer's checkpoint at the last step: --resume saves it
    resumed = run_cli(*args, "--resume")
    assert "is the last step's checkpoint; saving its weights" in resumed.output
    assert json.loads((out / "kdpipe_run.json").read_text())["status"] == "complete"
