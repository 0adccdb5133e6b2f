"""--resume of a run that already finished is a no-op that says so, also when the run was killed after its
last checkpoint and before its record said complete; --resume refuses changed options (issue 29, item 2).

Before the fix each `--resume` of a finished run trained one step more and replaced the model (4 -> 5 -> 6
steps), and `--resume --lr X` wrote the new --lr into the record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import expect_error, run_cli
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "KDPIPE_NO_PROGRESS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def train_args(world, out: Path, *extra: object) -> list[object]:
    return ["train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--max-steps", 4,
            "--batch-size", 4, "--save-steps", 2, "--lr", "1e-3", "--lr-scheduler", "constant", "--logging-steps", 1,
            *extra]


def finetune_args(world, out: Path, *extra: object) -> list[object]:
    return ["finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 16, "--output", out,
            "--max-steps", 3, "--batch-size", 4, "--lr", "1e-3", "--lr-scheduler", "constant", *extra]


def record(out: Path) -> dict:
    return json.loads((out / "kdpipe_run.json").read_text())


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.glob("*.safetensors")}


@pytest.mark.parametrize("args, kind, extra", [
    (train_args, "train-student", ["--full"]),
    (train_args, "train-student", ["--lora-r", 4]),  # LoRA: the adapter is kept as it is
    (finetune_args, "finetune", ["--full"]),
])
def test_resume_of_a_finished_run_is_a_no_op_and_refuses_changed_options(world, tmp_path, args, kind, extra):
    out = tmp_path / "run"
    run_cli(*args(world, out, *extra))
    before, weights = record(out), files(out)
    steps = before["global_step"]
    for _ in range(2):  # a requeued job resumes again and again
        result = run_cli(*args(world, out, *extra, "--resume"))
        assert f"{out} is already complete ({steps} steps): --resume has nothing to do" in result.output
        assert files(out) == weights and record(out) == before
    assert not (out / f"checkpoint-{steps + 1}").exists()
    expect_error(*args(world, out, *extra, "--resume", "--lr", "2e-3"),
                 match=f"--resume: {out} was trained with --lr 0.001 (now 0.002); resume with the recorded options")
    expect_error(*args(world, out, *extra, "--resume", "--max-steps", steps + 2),
                 match=f"--max-steps {steps} (now {steps + 2})")
    assert record(out) == before and record(out)["kind"] == kind


def test_changed_options_are_refused_on_the_resume_of_an_unfinished_run_too(world, tmp_path):
    out = tmp_path / "run"
    run_cli(*train_args(world, out, "--full"))
    unfinished = {**record(out), "status": "running"}
    (out / "kdpipe_run.json").write_text(json.dumps(unfinished))
    expect_error(*train_args(world, out, "--full", "--resume", "--loss", "rkl"),
                 match="was trained with --loss fkl (now rkl)")
    assert record(out) == unfinished


def test_killed_after_the_last_save_before_the_record_says_complete(world, tmp_path):
    """A SIGKILL while the final record is written (the model and the last checkpoint are on disk, the record
    still says running): --resume saves the last checkpoint's weights as the model, trains nothing more."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kdpipe.cli", *map(str, train_args(world, out, "--full"))]
    env = {**ENV, "KDPIPE_FAULT": "mid-write:kdpipe_run.json:2"}  # the 2nd record write: the one saying complete
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert record(out)["status"] == "running" and (out / "checkpoint-4").is_dir()
    last = load_file(out / "checkpoint-4" / "model.safetensors")
    result = run_cli(*train_args(world, out, "--full", "--resume"))
    assert f"note: {out / 'checkpoint-4'} is the last step's checkpoint; saving its weights" in result.output
    after = record(out)
    assert after["status"] == "complete" and after["global_step"] == 4, after
    losses = [h["loss"] for h in after["log_history"] if "loss" in h]
    assert len(losses) == 4 and after["train_loss"] == pytest.approx(sum(losses) / 4)
    assert not (out / "checkpoint-5").exists()
    model = load_file(out / "model.safetensors")
    assert model.keys() == last.keys() and all(model[k].equal(last[k]) for k in last)
    result = run_cli(*train_args(world, out, "--full", "--resume"))
    assert f"{out} is already complete (4 steps)" in result.output
