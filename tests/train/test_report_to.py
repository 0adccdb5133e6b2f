"""`train-student --report-to tensorboard,wandb`: the loggers users pick receive kdpipe's own figures (the
loss's parts per target position, the teacher's tail mass, tokens per second), read back from tensorboard's
event files and from wandb's offline run (WANDB_MODE=offline), and they are the figures the run logged:
on each logged step, loss = alpha * T^2 * divergence + (1 - alpha) * CE, computed separately."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import run_cli

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[test]')")
wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[test]')")

ALPHA, T, STEPS = 0.7, 2.0, 4
KD = ("kd/divergence", "kd/fkl", "kd/rkl", "kd/ce", "kd/tail_mass", "kd/tokens_per_second",
      "kd/target_tokens_per_second")


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(out.parent))
    mp.setenv("WANDB_SILENT", "true")
    try:
        run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--lora",
                "--max-steps", STEPS, "--batch-size", 8, "--logging-steps", 1, "--save-steps", 100,
                "--alpha", ALPHA, "--temperature", T, "--loss", "jsd", "--seed", 0,
                "--report-to", "tensorboard,wandb", "--run-name", "kd-report")
        wandb.finish()  # the CLI's process would finish the run at exit; in-process, the test does
    finally:
        mp.undo()
    history = json.loads((out / "kdpipe_run.json").read_text())["log_history"]
    return out, [h for h in history if "loss" in h]


def test_logged_steps_hold_kdpipes_figures(run):
    _, steps = run
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in steps:
        assert set(KD) <= set(s)
        assert s["loss"] == pytest.approx(ALPHA * T**2 * s["kd/divergence"] + (1 - ALPHA) * s["kd/ce"], rel=1e-4)
        assert 0 < s["kd/tail_mass"] < 1 and s["kd/fkl"] > 0 and s["kd/rkl"] > 0
        assert s["kd/tokens_per_second"] > s["kd/target_tokens_per_second"] > 0


def test_tensorboard_event_files(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, steps = run
    (folder,) = {p.parent for p in out.glob("runs/*/events.out.tfevents.*")}
    events = EventAccumulator(str(folder))
    events.Reload()
    for key in ("loss", *KD):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [s["step"] for s in steps]
        assert [e.value for e in scalars] == pytest.approx([s[key] for s in steps], rel=1e-6)  # float32 there


def test_wandb_offline_run(run):
    out, steps = run
    (file,) = out.parent.glob("wandb/offline-run-*/run-*.wandb")
    history = [row for row in wandb_records(file) if "train/loss" in row]
    assert [row["train/global_step"] for row in history] == [s["step"] for s in steps]
    for key in ("loss", *KD):
        assert [row[f"train/{key}"] for row in history] == pytest.approx([s[key] for s in steps], rel=1e-9)


def wandb_records(path: Path) -> list[dict]:
    """The history rows of a .wandb file: wandb's own protobuf records (wandb.proto), framed as a LevelDB
    log (a 7-byte header ':W&B', 0xBEE1, version; then 32 KiB blocks of chunks: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    magic, bee = struct.unpack("<4sH", data[:6])  # then one byte, the format's version
    assert (magic, bee) == (b":W&B", 0xBEE1), data[:7]
    rows, chunks, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                             for item in record.history.item})
    return rows
