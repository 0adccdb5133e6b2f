"""The run folder of train-student / finetune: one run at a time, never a broken model marked complete,
resume past a damaged checkpoint, every float option finite (issue 14, items 2, 4 and 8)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import expect_error, run_cli

from kdpipe import run_folder
from kdpipe.errors import KdpipeError
from kdpipe.train import setup as training


def test_a_second_run_into_the_same_output_is_refused_at_once(world, tmp_path, monkeypatch):
    """Run B starts while run A is loading its model (A has checked its folder but written nothing yet)."""
    out = tmp_path / "run"
    second = {}
    load = training.load_trainable

    def load_and_start_another(cfg):
        if not second:
            second["result"] = run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out,
                                       "--full", "--max-steps", 1, "--lr", "0.001", ok=False)
        return load(cfg)

    monkeypatch.setattr(training, "load_trainable", load_and_start_another)
    run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
            "--max-steps", 2, "--lr", "0.002", "--logging-steps", 1)
    b = second["result"]
    assert b.exit_code != 0 and isinstance(b.exception, SystemExit), b.output
    assert f"another kdpipe run is writing to {out} (its .lock is held)" in b.output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["config"]["lr"] == 0.002 and record["global_step"] == 2
    # the lock is released at the end: the folder is refused only as a finished run now
    expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
                 match="already holds a `kdpipe train-student` run")


def test_a_held_lock_refuses_finetune_too_and_a_refused_run_leaves_no_folder(world, tmp_path):
    from filelock import FileLock

    out = tmp_path / "sft"
    out.mkdir()
    with FileLock(out / ".lock"):
        expect_error("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 8,
                     "--output", out, "--full", "--max-steps", 1, match="another kdpipe run is writing to")
    assert [p.name for p in out.iterdir()] == [".lock"]
    nested = tmp_path / "a" / "b"
    expect_error("train-student", "--cache", world.cache, "--model", world.other_student, "--output", nested,
                 match="another tokenizer")
    assert not (tmp_path / "a").exists()


def test_an_output_that_cannot_be_written_is_named_before_the_model_loads(world, tmp_path, monkeypatch):
    """Issue 29 item 7: train-student and finetune on an output they cannot write ended in a traceback (after
    the model loaded). As root a read-only folder is still writable, so the path runs through a file here;
    the check (Store.check_writable) writes a temp file, the truth for read-only mounts too."""
    import kdpipe.models

    (tmp_path / "notes").write_text("mine")
    monkeypatch.setattr(kdpipe.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    target = tmp_path / "notes" / "run"
    expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", target,
                 match=f"--output {target} runs through the file {tmp_path / 'notes'}, not a folder")
    expect_error("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--output", target,
                 match=f"--output {target} runs through the file {tmp_path / 'notes'}, not a folder")
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--temperature", "inf"), ("--max-grad-norm", "nan"), ("--warmup", "nan"), ("--alpha", "nan"),
    ("--skew", "nan"), ("--beta", "-inf"), ("--weight-decay", "nan"), ("--lora-alpha", "nan"), ("--epochs", "inf"),
])
def test_non_finite_float_options_are_refused_before_any_folder(world, tmp_path, option, value):
    out = tmp_path / "r"
    expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", out, option, value,
                 match=f"options: '{option[2:].replace('-', '_')}' must be a finite number, not {float(value)}")
    assert not out.exists()


def test_non_finite_options_in_a_run_config_and_a_zero_lora_alpha(world, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"train:\n  model: {world.student}\n  cache: {world.cache}\n  lr: .inf\n")
    expect_error("run", config, "--dry-run", match="section 'train': 'lr' must be a finite number, not inf")
    expect_error("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--output", tmp_path / "f",
                 "--warmup", "nan", match="'warmup' must be a finite number")
    expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", tmp_path / "r",
                 "--lora-alpha", "0", match="lora_alpha must be positive, not 0.0")
    assert not (tmp_path / "f").exists() and not (tmp_path / "r").exists()


def test_a_run_whose_loss_becomes_non_finite_stops_and_is_not_complete(world, tmp_path):
    """A finite but absurd learning rate: the weights overflow after the first step, the loss turns nan or inf."""
    out = tmp_path / "diverged"
    result = expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
                          "--lr", "1e30", "--warmup", 0, "--max-steps", 6, "--logging-steps", 1, "--save-steps", 100,
                          match="training diverged: the loss became")
    assert "is marked failed, not complete. Lower --lr (now 1e+30)" in result.output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("training diverged")
    assert not (out / "model.safetensors").exists()


def test_weights_that_become_non_finite_at_the_last_step_are_not_saved(world, tmp_path):
    from transformers import TrainerCallback

    from kdpipe.stages import train_student

    class PoisonLastUpdate(TrainerCallback):  # stands for an update that overflowed after the last loss was computed
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == state.max_steps:
                with torch.no_grad():
                    training.causal_lm(model).lm_head.weight[0, 0] = float("nan")

    out = tmp_path / "poisoned"
    cfg = train_student.TrainStudentConfig(model=str(world.student), cache=str(world.cache), output=str(out),
                                           lora=False, max_steps=2)
    with pytest.raises(KdpipeError, match=r"1 trained weight tensor\(s\) hold nan or inf after step 2 "
                                                   r"\(lm_head.weight\)"):
        train_student.run(cfg, callbacks=[PoisonLastUpdate()])
    assert json.loads((out / "kdpipe_run.json").read_text())["status"] == "failed"
    assert not (out / "model.safetensors").exists()


class Crash(Exception):
    pass


def test_resume_passes_over_a_truncated_newest_checkpoint(world, tmp_path):
    from transformers import TrainerCallback

    from kdpipe.stages import train_student

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise Crash

    out = tmp_path / "run"
    options = dict(lora=False, max_steps=6, batch_size=4, lr=1e-3, save_steps=2, logging_steps=1, seed=3)
    cfg = train_student.TrainStudentConfig(model=str(world.student), cache=str(world.cache), output=str(out), **options)
    with pytest.raises(Crash):
        train_student.run(cfg, callbacks=[CrashAfterSave()])
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that filled mid-copy
    assert run_folder.damaged_files(out / "checkpoint-2") == []
    assert run_folder.damaged_files(out / "checkpoint-4") == ["model.safetensors is truncated or unreadable"]
    result = run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
                     "--resume", "--max-steps", 6, "--batch-size", 4, "--lr", "1e-3", "--save-steps", 2,
                     "--logging-steps", 1, "--seed", 3)
    assert (f"note: {out / 'checkpoint-4'} is damaged (model.safetensors is truncated or unreadable); passing over it "
            "to an earlier checkpoint") in result.output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["resumed_from"] == ["checkpoint-2"] and record["global_step"] == 6
