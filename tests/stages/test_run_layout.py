"""`kdpipe run` layouts: paths beside the config file, what --dry-run says, and `kdpipe evaluate` with no options
after an experiment (issue 14, items 16 and 18)."""

from __future__ import annotations

import json
import textwrap

from helpers import run_cli

from kdpipe.data import arithmetic


def test_data_files_are_found_beside_the_config_and_dry_run_says_what_is_missing(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp").mkdir()
    rows = arithmetic.generate("train")[:8]
    (tmp_path / "exp" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "exp" / "sft.yaml").write_text(textwrap.dedent(f"""\
        name: beside
        finetune:
          model: {world.student}
          dataset: train.jsonl
          template: arithmetic
          lora: false
          max_steps: 1
          batch_size: 4
        """))
    plan = run_cli("run", "exp/sft.yaml", "--dry-run").output
    assert "each command shows the options that differ from their defaults" in plan
    assert "--dataset exp/train.jsonl" in plan and "missing" not in plan, plan
    run_cli("run", "exp/sft.yaml")  # run from another folder: the file beside the config is the one read
    record = json.loads((tmp_path / "runs/beside/finetune/kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["config"]["dataset"] == "exp/train.jsonl"
    (tmp_path / "exp" / "train.jsonl").rename(tmp_path / "exp" / "moved.jsonl")
    (tmp_path / "exp" / "sft.yaml").write_text((tmp_path / "exp" / "sft.yaml").read_text().replace("beside", "gone"))
    plan = run_cli("run", "exp/sft.yaml", "--dry-run").output
    assert "     missing: dataset exp/train.jsonl does not exist" in plan, plan


EXPERIMENT = """\
name: lay
cache:
  model: {teacher}
  dataset: kdpipe:arithmetic
  limit: 16
  top_k: 8
heldout_cache:
  model: {teacher}
  dataset: kdpipe:arithmetic
  split: test
  limit: 6
  top_k: 8
train:
  model: {student}
  cache: "@cache"
  lora: false
  max_steps: 2
  batch_size: 8
baseline:
  model: {student}
  dataset: kdpipe:arithmetic
  limit: 16
  lora: false
  max_steps: 2
  batch_size: 8
evaluate:
  model: ["@train", "@baseline"]
  dataset: kdpipe:arithmetic
  split: test
  limit: 5
  task: [exact-match]
  max_new_tokens: 4
  cache: "@heldout_cache"
  plot: false
"""


def test_evaluate_without_options_finds_the_latest_run_of_an_experiment(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lay.yaml").write_text(EXPERIMENT.format(teacher=world.teacher, student=world.student))
    table = run_cli("run", "lay.yaml").output
    assert ("train s: each run's wall time, the runs measured one after the other (not alternated): a change of "
            "machine load between them moves their ratio") in table  # the two students' times are not a benchmark
    result = run_cli("evaluate")
    assert f"evaluating the latest finished run runs/lay/baseline (of the experiment {tmp_path / 'lay.yaml'})" \
        in result.output, result.output
    results = json.loads((tmp_path / "runs/lay/baseline/eval/results.json").read_text())
    roles = {m["role"]: m["path"] for m in results["models"]}
    assert roles == {"student": "runs/lay/baseline", "base": str(world.student), "teacher": str(world.teacher)}
    # the experiment's own evaluation: its data, task and held-out cache
    assert (results["data"]["split"], results["data"]["examples"], results["data"]["tasks"]) == ("test", 5, ["exact-match"])
    assert results["cache"] == str(tmp_path / "cache/lay-heldout")
    assert all("fidelity/kl" in m["metrics"] and "exact-match/exact_match" in m["metrics"] for m in results["models"])
