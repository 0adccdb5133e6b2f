"""A run that diverges never leaves a checkpoint that --resume would pick up (issue 29 item 11): with --lr 1e30
the first update makes every weight ~1e30 (finite), the next loss is nan; checkpoint-1 holds those weights."""

from __future__ import annotations

import json

from helpers import expect_error

from kdpipe import run_folder


def test_lr_1e30_leaves_no_checkpoint_for_resume(world, tmp_path):
    out = tmp_path / "diverged"
    result = expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
                          "--lr", "1e30", "--warmup", 0, "--max-steps", 6, "--logging-steps", 1, "--save-steps", 1,
                          match="training diverged: the loss became nan at step 2")
    assert ("checkpoint-1 held the weights that diverged: renamed diverged-checkpoint-N, so --resume never "
            "continues from them") in result.output
    assert json.loads((out / "kdpipe_run.json").read_text())["status"] == "failed"
    assert run_folder.last_checkpoint(out) is None and (out / "diverged-checkpoint-1").is_dir()
