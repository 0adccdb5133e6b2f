"""`seeds:` in `kdpipe run` (issue 28 item 5): the student steps repeated per seed into their own folders,
the teacher and its caches computed once, a table of mean (min-max) that agrees with what each seed's own
results.json says, and a rerun that skips the finished seeds."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from helpers import kdpipe
from test_run import MINI

SEEDED = MINI.replace("seed: 0\n", "seed: 0\nseeds: [3, 5]\nthreads: 1\n", 1).replace("  kv_heads: 1\n  seed: 1\n",
                                                                                       "  kv_heads: 1\n")
PER_SEED = ("student_init", "train", "baseline", "evaluate")
FOLDERS = {"student_init": "student-init", "train": "train", "baseline": "baseline", "evaluate": "eval"}


@pytest.fixture()
def seeded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mini.yaml").write_text(SEEDED)
    return tmp_path


def test_two_seeds_give_per_seed_runs_and_the_mean_and_range_of_their_results(seeded):
    first = kdpipe("run", "mini.yaml").output
    assert "torch threads: 1 (threads: in mini.yaml" in first
    assert "12 step(s) run, 0 skipped" in first  # 4 shared + 2 x 4 per seed
    for step in ("teacher_init", "finetune", "cache", "heldout_cache"):  # once, in the usual folders
        assert first.count(f"] {step}: kdpipe") == 1
    per_seed = {}
    for seed in (3, 5):
        for step in PER_SEED:
            assert f"] {step}.seed{seed}: kdpipe" in first
        run = json.loads((seeded / f"runs/mini/train-seed{seed}/kdpipe_run.json").read_text())
        assert run["status"] == "complete" and run["config"]["seed"] == seed
        assert run["config"]["cache"] == "cache/mini"  # the shared cache
        init = json.loads((seeded / f"runs/mini/student-init-seed{seed}/kdpipe_init.json").read_text())
        assert init["options"]["seed"] == seed
        per_seed[seed] = json.loads((seeded / f"runs/mini/eval-seed{seed}/results.json").read_text())

    summary = json.loads((seeded / "runs/mini/eval/results.json").read_text())
    assert summary["seeds"] == [3, 5]
    labels = {m["label"]: m for m in summary["models"]}
    assert list(labels) == ["teacher", "student-init", "student KD", "baseline"]
    for seed, results in per_seed.items():
        assert [m["path"] for m in results["models"]] == ["runs/mini/finetune", f"runs/mini/student-init-seed{seed}",
                                                          f"runs/mini/train-seed{seed}", f"runs/mini/baseline-seed{seed}"]
    for i, entry in enumerate(labels.values()):
        for key in ("exact-match/exact_match", "fidelity/kl", "fidelity/top1_agreement"):
            values = [per_seed[s]["models"][i]["metrics"][key] for s in (3, 5)]
            stats = entry["metrics"][key]
            assert stats["values"] == {"3": values[0], "5": values[1]}
            assert stats["mean"] == pytest.approx(statistics.fmean(values), abs=0)
            assert (stats["min"], stats["max"]) == (min(values), max(values))
    kd = labels["student KD"]["metrics"]["fidelity/kl"]
    assert kd["min"] < kd["max"]  # two seeds, two students: the range is real
    row = next(line for line in first.splitlines() if line.startswith("student KD "))
    assert f"{kd['mean']:.4f} ({kd['min']:.4f}-{kd['max']:.4f})" in row
    teacher = labels["teacher"]["metrics"]["fidelity/kl"]
    assert teacher["min"] == teacher["max"]  # the shared teacher: one value
    assert "over 2 seed(s) 3, 5: each cell is the mean (min-max)" in first

    # seed 5's training was lost: the rerun skips everything of seed 3 and redoes only seed 5's train and eval
    shutil.rmtree(seeded / "runs/mini/train-seed5")
    again = kdpipe("run", "mini.yaml").output
    assert "2 step(s) run, 10 skipped" in again, again
    assert "] train.seed5: kdpipe" in again and "] evaluate.seed5: kdpipe" in again
    assert all(f"] {step}.seed3: skipped" in again for step in PER_SEED)
    assert "student KD " in again and "over 2 seed(s) 3, 5" in again


def test_a_seeded_section_with_its_own_seed_and_bad_seed_lists_are_refused(seeded):
    (seeded / "own.yaml").write_text(SEEDED.replace("  kv_heads: 1\ntrain:", "  kv_heads: 1\n  seed: 1\ntrain:"))
    result = kdpipe("run", "own.yaml", "--dry-run", ok=False)
    assert result.exit_code != 0 and "section 'student_init' sets 'seed: 1', but it runs once per entry of 'seeds:'" \
        in result.output
    for bad, message in (("[]", "non-empty list of integers"), ("[1, 1]", "lists a seed twice"),
                         ("3", "non-empty list of integers")):
        (seeded / "bad.yaml").write_text(SEEDED.replace("seeds: [3, 5]", f"seeds: {bad}"))
        result = kdpipe("run", "bad.yaml", "--dry-run", ok=False)
        assert result.exit_code != 0 and message in result.output, result.output
    (seeded / "threads.yaml").write_text(SEEDED.replace("threads: 1", "threads: 0"))
    assert "'threads' must be a positive integer" in kdpipe("run", "threads.yaml", "--dry-run", ok=False).output


def test_a_cut_student_is_made_once_and_without_a_seed(seeded):
    """init-model --from copies weights (no seed changes it, and it refuses one): shared by the seeds."""
    from kdpipe.stages import run

    cut = SEEDED.replace('  tokenizer: "@finetune"\n  hidden_size: 32\n  layers: 1\n  heads: 1\n  kv_heads: 1\n',
                         '  from_model: "@finetune"\n  layers: 1\n')
    assert cut != SEEDED
    (seeded / "cut.yaml").write_text(cut)
    names = {step.name: cfg for step, cfg in run.plan(seeded / "cut.yaml").steps}
    assert "student_init" in names and not any(n.startswith("student_init.seed") for n in names)
    assert names["student_init"].seed == 0 == type(names["student_init"])().seed  # the default: none given
    assert {names[f"train.seed{s}"].model for s in (3, 5)} == {names["student_init"].output}
    out = kdpipe("run", "cut.yaml", "--dry-run").output
    assert "student_init    [run]" in out and "--from-model" in out and "[error]" not in out
