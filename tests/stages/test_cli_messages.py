"""Clear messages where a library traceback or a wrong word used to come (issue 14, items 10, 11, 14)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from helpers import expect_error, run_cli


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


def test_init_model_says_when_the_vocabulary_is_raised_and_offers_one_token_per_character(tmp_path):
    from transformers import AutoTokenizer

    raised = run_cli("init-model", "--output", tmp_path / "small", "--train-tokenizer-on", "kdpipe:arithmetic",
                     "--vocab-size", 100, "--hidden-size", 32, "--layers", 1, "--heads", 2, "--kv-heads", 1)
    assert ("note: --vocab-size 100 is raised to 258: a byte-level vocabulary holds the 256 byte tokens and 2 special "
            "tokens before any merge") in raised.output
    assert len(AutoTokenizer.from_pretrained(tmp_path / "small")) == 258
    chars = run_cli("init-model", "--output", tmp_path / "chars", "--train-tokenizer-on", "kdpipe:arithmetic",
                    "--char-level", "--hidden-size", 32, "--layers", 1, "--heads", 2, "--kv-heads", 1)
    assert "note: --char-level: 258 tokens (256 bytes + 2 special tokens, no merges)" in chars.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "chars")
    for text in ("8420 = 7000 + 1420", "zs sz", "Write 12 as a sum"):
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert len(pieces) == len(text) and tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_a_run_config_takes_char_level(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("student_init:\n  train_tokenizer_on: kdpipe:arithmetic\n  char_level: true\n"
                                     "  hidden_size: 32\n  layers: 1\n  heads: 2\n  kv_heads: 1\n")
    out = run_cli("run", "c.yaml").output
    assert "note: --char-level: 258 tokens" in out
    assert len(AutoTokenizer.from_pretrained(tmp_path / "runs/c/student-init")) == 258
    record_file = tmp_path / "runs/c/student-init/kdpipe_init.json"
    record = json.loads(record_file.read_text())
    assert "student_init: skipped" in run_cli("run", "c.yaml").output
    del record["options"]["char_level"]  # a folder written before the option existed: taken as its default (false)
    record_file.write_text(json.dumps(record))
    (tmp_path / "c.yaml").write_text((tmp_path / "c.yaml").read_text().replace("  char_level: true\n", ""))
    assert "student_init: skipped" in run_cli("run", "c.yaml").output


def test_exact_match_results_record_no_label_names_and_cache_info_explains_its_report(world, tmp_path):
    run_cli("evaluate", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--split", "test", "--limit", 3,
            "--task", "exact-match", "--max-new-tokens", 3, "--no-plot", "--output", tmp_path / "eval")
    data = json.loads((tmp_path / "eval" / "results.json").read_text())["data"]
    assert data["tasks"] == ["exact-match"] and "label_names" not in data and "label_names" not in data["config"]
    info = run_cli("cache", "info", world.cache).output
    assert "tokenize_report" not in info
    assert "examples_cut_or_skipped         none (every example fit max_length=2048)" in info, info


def test_make_install_leaves_out_the_test_extras_and_the_license_is_an_spdx_string():
    import subprocess
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[2]
    plan = subprocess.run(["make", "-n", "install", "VENV=/nonexistent-venv"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    assert "pip install -q -e .\n" in plan and "[test]" not in plan
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first setuptools that reads SPDX strings
