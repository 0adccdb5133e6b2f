"""Clear messages where a library traceback or a wrong word used to come (issue 14, items 10, 11, 14)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from train_fixtures import *  # noqa: F401,F403
from train_fixtures import run_cli


def expect_error(*args, match):
    result = run_cli(*args, ok=False)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
    assert match in result.output, result.output
    return result


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(world, tmp_path):
    why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU"
    message = f"--device cuda: this torch ({torch.__version__}) {why}; use --device cpu, or auto"
    expect_error("evaluate", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 4,
                 "--device", "cuda", "--output", tmp_path / "eval", match=message)
    expect_error("cache-teacher", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--limit", 4,
                 "--device", "cuda", "--cache", tmp_path / "cache", match=message)
    expect_error("evaluate", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--device", "gpu",
                 "--output", tmp_path / "eval", match="--device gpu is not a device; use auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "cache").exists()


MINI = """\
name: lab
train:
  model: {student}
  cache: {cache}
  max_steps: 1
evaluate:
  model: ["@train"]
  dataset: kdpipe:arithmetic
"""


def test_labels_as_a_list_of_pairs_is_read_and_other_shapes_are_a_clear_error(world, tmp_path, monkeypatch):
    from kdpipe.stages import run as pipeline_run

    monkeypatch.chdir(tmp_path)
    base = MINI.format(student=world.student, cache=world.cache)
    config = tmp_path / "lab.yaml"
    config.write_text(base + textwrap.dedent("""\
        labels:
          - "@train": student after KD
          - runs/old: previous
        """))
    plan = pipeline_run.plan(config)
    assert plan.labels == {"runs/lab/train": "student after KD", "runs/old": "previous"}
    config.write_text(base + "labels: [teacher, student]\n")
    expect_error("run", config, "--dry-run",
                 match="'labels' must map a model to its name in the final table, e.g.\nlabels:\n  \"@train\": student")


def test_adapter_whose_base_folder_is_gone_names_adapter_config(world, tmp_path):
    from peft import LoraConfig, get_peft_model

    from kdpipe.models import load_model

    base = tmp_path / "base"
    shutil.copytree(world.student, base)
    adapter = tmp_path / "adapter"
    model = get_peft_model(load_model(str(base), "fp32", "cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    shutil.rmtree(base)  # the base model moved away
    expect_error("evaluate", "--model", adapter, "--dataset", "kdpipe:arithmetic", "--limit", 4,
                 "--output", tmp_path / "eval",
                 match=f"the LoRA adapter {adapter} is on the base model {base}, which does not exist (any more): that "
                       f"path comes from {adapter / 'adapter_config.json'} (base_model_name_or_path). Point it at where "
                       "the base model is now")
