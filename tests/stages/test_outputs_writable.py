"""Every output that cannot be written is named before any model loads or any shard is read (issue 29 item 7):
generate, cache merge and evaluate (train-student, finetune and merge-lora: tests/train/test_run_folder.py,
tests/train/test_lora.py); evaluate writes its results even when the plots fail.

As root a read-only folder is still writable: most cases run through a regular file in-process; one
subprocess drops root's override capability (setpriv) for the real read-only folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import expect_error, read_only_folder, run_cli


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every check below must come first."""
    import kdpipe.evaluation.specs
    import kdpipe.generation.hf

    def fail(*args, **kwargs):
        pytest.fail("a model loaded before the output was checked")

    monkeypatch.setattr(kdpipe.evaluation.specs, "load_model", fail)
    monkeypatch.setattr(kdpipe.generation.hf.HFGenerator, "load", fail)


def generate(world, output):
    return ("generate", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--limit", 2, "--device", "cpu",
            "--max-new-tokens", 2, "--output", output)


def evaluate(world, output):
    return ("evaluate", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 2,
            "--task", "perplexity", "--device", "cpu", "--output", output)


def test_an_output_through_a_file_or_a_file_as_folder_is_named_first(world, tmp_path, no_model):
    notes = tmp_path / "notes"
    notes.write_text("mine")
    expect_error(*generate(world, notes / "out.jsonl"),
                 match=f"--output's folder {notes} is a file, not a folder")
    (tmp_path / "d.jsonl").mkdir()
    expect_error(*generate(world, tmp_path / "d.jsonl"),
                 match=f"--output {tmp_path / 'd.jsonl'} is a folder; give a file path (data/NAME.jsonl)")
    expect_error("cache", "merge", world.cache, "--output", notes / "merged",
                 match=f"--output {notes / 'merged'} runs through the file {notes}, not a folder")
    expect_error(*evaluate(world, notes), match=f"--output {notes} is a file, not a folder")
    expect_error(*evaluate(world, notes / "eval"), match=f"--output {notes / 'eval'} runs through the file {notes}")
    assert notes.read_text() == "mine" and not any((tmp_path / "d.jsonl").iterdir())


def test_a_read_only_folder_is_named_first(world, tmp_path):
    folder = tmp_path / "ro"
    prefix = read_only_folder(folder)  # root writes anywhere: a subprocess without that capability
    commands = [generate(world, folder / "out.jsonl"), ("cache", "merge", world.cache, "--output", folder / "m"),
                evaluate(world, folder / "eval")]
    code = ("import json, sys\nfrom click.testing import CliRunner\nfrom kdpipe.cli import main\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    r = CliRunner().invoke(main, args)\n"
            "    print(json.dumps([r.exit_code, r.output, repr(r.exception)]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KDPIPE_NO_PROGRESS": "1"}
    result = subprocess.run([*prefix, sys.executable, "-c", code, json.dumps([[str(a) for a in c] for c in commands])],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    expected = [f"--output's folder {folder} cannot be written: Permission denied; choose a folder you can write to",
                f"--output {folder / 'm'} cannot be written (it would be made inside {folder}): Permission denied",
                f"--output {folder / 'eval'} cannot be written (it would be made inside {folder}): Permission denied"]
    assert [o[0] for o in outcomes] == [2, 2, 2], outcomes
    for (_, output, exception), message in zip(outcomes, expected):
        assert message in output and exception.startswith("SystemExit"), output
    assert not any(folder.iterdir())


def test_evaluate_writes_its_results_when_the_plots_fail(world, tmp_path, monkeypatch):
    import kdpipe.evaluation.plots

    def broken(*args, **kwargs):
        raise RuntimeError("Agg renderer: out of memory")

    monkeypatch.setattr(kdpipe.evaluation.plots, "write_plots", broken)
    out = tmp_path / "eval"
    result = run_cli(*evaluate(world, out), "--plot")
    assert ("warning: the plots could not be written (RuntimeError: Agg renderer: out of memory); the results are "
            "written without them") in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["metrics"]["perplexity/perplexity"] > 1
    assert (out / "results.csv").is_file()


def test_a_missing_matplotlib_is_said_only_when_plots_were_asked_for(world, tmp_path, monkeypatch):
    """Issue 29 item 14: plots are optional; "matplotlib is not installed" on every default run was noise."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    message = "matplotlib is not installed: no plots written (pip install matplotlib)"
    assert message not in run_cli(*evaluate(world, tmp_path / "a")).output
    assert message in run_cli(*evaluate(world, tmp_path / "b"), "--plot").output
    assert message not in run_cli(*evaluate(world, tmp_path / "c"), "--no-plot").output
    assert json.loads((tmp_path / "a" / "results.json").read_text())["files"] == [
        str(tmp_path / "a" / "results.json"), str(tmp_path / "a" / "results.csv")]
