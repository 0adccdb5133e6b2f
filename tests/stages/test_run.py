"""`kdpipe run CONFIG`: a miniature experiment end to end, a rerun that skips every step, bad configs."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import dry_run_refuses, kdpipe

MINI = """\
name: mini
seed: 0
labels:
  "@finetune": teacher
  "@train": student KD
teacher_init:
  train_tokenizer_on: kdpipe:arithmetic
  vocab_size: 300
  hidden_size: 32
  layers: 1
  heads: 1
  kv_heads: 1
finetune:
  model: "@teacher_init"
  dataset: kdpipe:arithmetic
  limit: 64
  lora: false
  max_steps: 3
  batch_size: 16
  lr: 0.003
  save_steps: 2
cache:
  model: "@finetune"
  dataset: kdpipe:arithmetic
  limit: 64
  top_k: 4
  dtype: fp32
heldout_cache:
  model: "@finetune"
  dataset: kdpipe:arithmetic
  split: test
  limit: 16
  top_k: 4
  dtype: fp32
student_init:
  tokenizer: "@finetune"
  hidden_size: 32
  layers: 1
  heads: 1
  kv_heads: 1
  seed: 1
train:
  model: "@student_init"
  cache: "@cache"
  lora: false
  max_steps: 3
  batch_size: 16
  lr: 0.003
  save_steps: 2
baseline:
  model: "@student_init"
  dataset: kdpipe:arithmetic
  limit: 64
  lora: false
  max_steps: 3
  batch_size: 16
  lr: 0.003
  save_steps: 2
evaluate:
  model: ["@finetune", "@student_init", "@train", "@baseline"]
  dataset: kdpipe:arithmetic
  split: test
  limit: 8
  task: [exact-match]
  max_new_tokens: 6
  cache: "@heldout_cache"
  plot: false
"""


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDPIPE_NO_PROGRESS", "1")
    (tmp_path / "mini.yaml").write_text(MINI)
    return tmp_path


def test_miniature_experiment_runs_then_rerun_skips_everything(workdir):
    first = kdpipe("run", "mini.yaml").output
    for step in ("teacher_init", "finetune", "cache", "heldout_cache", "student_init", "train", "baseline", "evaluate"):
        assert f"{step}: kdpipe " in first, first
    assert "8 step(s) run, 0 skipped" in first
    # outputs where the plan says, each complete
    for run in ("finetune", "train", "baseline"):
        assert json.loads((workdir / "runs/mini" / run / "kdpipe_run.json").read_text())["status"] == "complete"
    assert json.loads((workdir / "cache/mini/manifest.json").read_text())["complete"]
    results = json.loads((workdir / "runs/mini/eval/results.json").read_text())
    assert len(results["models"]) == 4
    # the final table: labels from the config, a row per model
    assert "teacher" in first and "student KD" in first and "exact match" in first and "top-1 agree" in first

    again = kdpipe("run", "mini.yaml").output
    assert "0 step(s) run, 8 skipped" in again, again
    assert again.count("skipped (") == 8
    assert "student KD" in again  # the table is printed again from results.json

    # --dry-run on a finished experiment: every step would be skipped
    plan = kdpipe("run", "mini.yaml", "--dry-run").output
    assert plan.count("[skip]") == 8


def test_changed_settings_are_refused_and_interrupted_run_restarts(workdir):
    kdpipe("run", "mini.yaml", "--only", "teacher_init")
    kdpipe("run", "mini.yaml", "--only", "finetune")
    # a run recorded before an option existed (training_args) is the same run: its default changes nothing
    record_file = workdir / "runs/mini/finetune/kdpipe_run.json"
    record = json.loads(record_file.read_text())
    del record["config"]["training_args"]
    record_file.write_text(json.dumps(record))
    assert "skipped (" in kdpipe("run", "mini.yaml", "--only", "finetune").output
    (workdir / "mini.yaml").write_text(MINI.replace("lr: 0.003\n  save_steps: 2\ncache:", "lr: 0.001\n  save_steps: 2\ncache:"))
    result = kdpipe("run", "mini.yaml", "--only", "finetune", ok=False)
    assert result.exit_code != 0 and "other settings" in result.output and "lr" in result.output
    # a run left 'running' without a checkpoint (crash before the first save) is started over
    (workdir / "mini.yaml").write_text(MINI)
    record = json.loads(record_file.read_text())
    record["status"] = "running"
    record_file.write_text(json.dumps(record))
    for ckpt in (workdir / "runs/mini/finetune").glob("checkpoint-*"):
        import shutil

        shutil.rmtree(ckpt)
    out = kdpipe("run", "mini.yaml", "--only", "finetune").output
    assert "starting it over" in out
    assert json.loads(record_file.read_text())["status"] == "complete"


def test_dry_run_loads_nothing_and_shows_commands(workdir):
    out = kdpipe("run", "mini.yaml", "--dry-run").output
    assert "8 step(s)" in out and out.count("[run]") == 8
    assert "kdpipe train-student --model runs/mini/student-init" in out and "--cache cache/mini" in out
    assert not (workdir / "runs").exists() and not (workdir / "cache").exists()
    assert "1 step(s)" in kdpipe("run", "mini.yaml", "--dry-run", "--only", "train").output
    assert "2 step(s)" in kdpipe("run", "mini.yaml", "--dry-run", "--from", "baseline").output


@pytest.mark.parametrize(
    "edit, words",
    [
        (("  top_k: 4\n  dtype: fp32\nheldout", "  top_kk: 4\n  dtype: fp32\nheldout"), ["section 'cache'", "top_kk", "top_k"]),
        (("train:\n  model:", "train:\n  temprature: 2\n  model:"), ["section 'train'", "temprature", "temperature"]),
        (("evaluate:", "evalute:"), ["unknown section 'evalute'"]),
        (('cache: "@cache"', 'cache: "@cahce"'), ["section 'train'", "@cahce", "names no step"]),
        (('model: "@finetune"\n  dataset: kdpipe:arithmetic\n  limit: 64',
          'model: "@train"\n  dataset: kdpipe:arithmetic\n  limit: 64'), ["section 'cache'", "comes later"]),
        (("  max_steps: 3\n  batch_size: 16\n  lr: 0.003\n  save_steps: 2\ncache",
          "  max_steps: three\n  batch_size: 16\n  lr: 0.003\n  save_steps: 2\ncache"), ["section 'finetune'", "max_steps", "integer"]),
    ],
)
def test_bad_config_is_a_clear_error(workdir, edit, words):
    dry_run_refuses(workdir, MINI, edit, words)


def test_base_inheritance_and_bad_flags(workdir):
    (workdir / "child.yaml").write_text(textwrap.dedent("""\
        base: mini.yaml
        name: child
        train:
          loss: rkl
          temperature: 2
        baseline: null
        evaluate:
          model: ["@finetune", "@train"]
    """))
    out = kdpipe("run", "child.yaml", "--dry-run").output
    assert "7 step(s)" in out and "--loss rkl --temperature 2.0" in out and "runs/child/train" in out
    assert "baseline" not in out
    assert "no such step" in kdpipe("run", "child.yaml", "--only", "baseline", ok=False).output
    (workdir / "loop.yaml").write_text("base: loop.yaml\n")
    assert "loops back" in kdpipe("run", "loop.yaml", ok=False).output


def test_dry_run_names_a_train_section_without_a_cache(workdir, tiny_model_dir):
    """Issue 29 item 11: a `train:` section with no cache (and no `cache:` step) planned as a plain [run]; the
    real run then stopped at "no cache given". The dry run now names what is missing, for each stage that needs
    it; the same section with a cache does not."""
    (workdir / "exp.yaml").write_text(f"name: x\ntrain:\n  model: {tiny_model_dir}\n")
    out = kdpipe("run", "exp.yaml", "--dry-run").output
    assert "missing: cache is not set (the step needs it: give 'cache:' in its section, or a 'cache:' section " \
           "before it)" in out, out
    (workdir / "ft.yaml").write_text("name: y\nfinetune:\n  dataset: kdpipe:arithmetic\n")
    assert "missing: model is not set" in kdpipe("run", "ft.yaml", "--dry-run").output
    (workdir / "ok.yaml").write_text(f"name: z\ncache:\n  model: {tiny_model_dir}\n  dataset: kdpipe:arithmetic\n"
                                     f"train:\n  model: {tiny_model_dir}\n  cache: '@cache'\n")
    assert "missing" not in kdpipe("run", "ok.yaml", "--dry-run").output


@pytest.mark.parametrize(("value", "write"), [("true", "lora: false"), ("false", "lora: true")])
def test_a_cli_off_switch_in_yaml_says_how_to_write_it(workdir, value, write):
    """Issue 29 item 11: `full: true` (the CLI's --lora/--full) in a config got only the list of known keys."""
    (workdir / "f.yaml").write_text(f"name: x\ntrain:\n  model: m\n  cache: c\n  full: {value}\n")
    out = kdpipe("run", "f.yaml", "--dry-run", ok=False)
    assert out.exit_code != 0
    assert f"section 'train': unknown key 'full'; '--full' is the command line's switch for 'lora': write " \
           f"'{write}' in a config file" in out.output, out.output
