"""`kdpipe run` with `rounds:`: on-policy rounds (student generates, teacher caches, student trains on)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import dry_run_refuses, kdpipe

from kdpipe.errors import KdpipeError

ROUNDS = """\
name: rr
seed: 0
teacher_init:
  train_tokenizer_on: kdpipe:arithmetic
  vocab_size: 300
  hidden_size: 32
  layers: 1
  heads: 1
  kv_heads: 1
cache:
  model: "@teacher_init"
  dataset: kdpipe:arithmetic
  limit: 16
  top_k: 4
  dtype: fp32
student_init:
  tokenizer: "@teacher_init"
  hidden_size: 32
  layers: 1
  heads: 1
  kv_heads: 1
  seed: 1
train:
  model: "@student_init"
  cache: "@cache"
  lora: false
  max_steps: 2
  batch_size: 8
  lr: 0.003
  save_steps: 1
rounds:
  count: 2
  fraction: 0.5
  generate: {temperature: 1.0, max_new_tokens: 6, batch_size: 8}
  train: {max_steps: 3}
evaluate:
  model: ["@student_init", "@train"]
  dataset: kdpipe:arithmetic
  split: test
  limit: 4
  task: [exact-match]
  max_new_tokens: 4
  plot: false
"""
ORDER = ["teacher_init", "cache", "student_init", "train", "round1_generate", "round1_cache", "round1_train",
         "round2_generate", "round2_cache", "round2_train", "evaluate"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDPIPE_NO_PROGRESS", "1")
    (tmp_path / "rr.yaml").write_text(ROUNDS)
    return tmp_path


def positions(out: str, marker: str) -> list[int]:
    return [out.index(f"{step}{marker}") for step in ORDER]


def test_two_rounds_plan_run_rerun_and_resume(workdir):
    plan = kdpipe("run", "rr.yaml", "--dry-run").output
    assert "11 step(s)" in plan and plan.count("[run]") == 11
    assert positions(plan, " ") == sorted(positions(plan, " "))  # the steps in order
    assert "--model runs/rr/train --output runs/rr/round-1/generated.jsonl" in plan
    assert "--fraction 0.5 --fraction-seed 1" in plan and "--fraction-seed 2" in plan  # other prompts
    assert "--cache cache/rr --cache runs/rr/round-1/cache" in plan  # the original cache and the round's
    assert "--model runs/rr/round-1/train --output runs/rr/round-2/train --full --max-steps 3" in plan
    assert "student steps: train 2 + round1_train 3 + round2_train 3 = 8" in plan
    assert not (workdir / "runs").exists()

    first = kdpipe("run", "rr.yaml").output
    assert positions(first, ": kdpipe ") == sorted(positions(first, ": kdpipe "))
    assert "11 step(s) run, 0 skipped" in first
    for r in (1, 2):
        folder = workdir / f"runs/rr/round-{r}"
        lines = (folder / "generated.jsonl").read_text().splitlines()
        assert len(lines) == 8  # ceil(0.5 x 16)
        assert json.loads(lines[0])["kdpipe_generate"]["model"].endswith("runs/rr/train" if r == 1 else
                                                                         "runs/rr/round-1/train")
        manifest = json.loads((folder / "cache/manifest.json").read_text())
        assert manifest["complete"] and manifest["generated"]["rows"] == 8
        run = json.loads((folder / "train/kdpipe_run.json").read_text())
        assert run["status"] == "complete" and run["config"]["max_steps"] == 3
    ids = [{json.loads(x)["id"] for x in (workdir / f"runs/rr/round-{r}/generated.jsonl").open()}
           for r in (1, 2)]
    assert ids[0] != ids[1]
    results = json.loads((workdir / "runs/rr/eval/results.json").read_text())
    assert len(results["models"]) == 4  # student-init, train, round 1, round 2
    assert "round 1 student" in first and "round 2 student" in first

    again = kdpipe("run", "rr.yaml").output
    assert "0 step(s) run, 11 skipped" in again and "round 2 student" in again

    # a run killed in the last round's training (its folder gone or left 'running'): it resumes there
    shutil.rmtree(workdir / "runs/rr/round-2/train")
    resumed = kdpipe("run", "rr.yaml").output
    assert "2 step(s) run, 9 skipped" in resumed, resumed  # round2_train, then evaluate
    assert "round2_generate: skipped" in resumed and "round2_train: kdpipe train-student" in resumed
    # killed while the round's completions were written (3 rows of 8 on disk): generate continues the file
    gen = workdir / "runs/rr/round-2/generated.jsonl"
    side, text = workdir / "runs/rr/round-2/generated.jsonl.kdpipe-generate.json", gen.read_text()
    side.write_text(json.dumps({**json.loads(side.read_text()), "complete": False}))
    gen.write_text("".join(text.splitlines(keepends=True)[:3]))
    assert "[resume] runs/rr/round-2/generated.jsonl is partly written" in kdpipe(
        "run", "rr.yaml", "--dry-run").output
    out = kdpipe("run", "rr.yaml", "--only", "round2_generate").output
    assert "partly written" in out and "generated 5 completions" in out, out
    assert gen.read_text() == text  # seeded per row: the same file as the uninterrupted run


@pytest.mark.parametrize("edit, words", [
    (("fraction: 0.5", "fraction: 1.5"), ["section 'rounds'", "'fraction'", "[0, 1]", "1.5"]),
    (("count: 2", "count: 0"), ["section 'rounds'", "'count'", ">= 1", "0"]),
    (("count: 2", "count: 2\n  fracton: 0.3"), ["section 'rounds'", "unknown key 'fracton'", "fraction"]),
    (("train: {max_steps: 3}", "train: {model: x}"), ["'train'", "'model' is set by the rounds"]),
    (("generate: {temperature: 1.0,", "generate: {seed: 3,"), ["'generate'", "'seed' is set by the rounds"]),
    (("generate: {temperature: 1.0,", "generate: {temperatur: 1.0,"), ["round 1", "temperatur"]),
    (("  train: {max_steps: 3}", "  train: {max_steps: 0}"), ["round 1", "max_steps"]),
])
def test_bad_rounds_are_clear_errors(workdir, edit, words):
    dry_run_refuses(workdir, ROUNDS, edit, words)


def test_rounds_without_train_lora_merge_and_fraction_zero(workdir):
    (workdir / "no-train.yaml").write_text("base: rr.yaml\ntrain: null\nevaluate: null\n")
    out = kdpipe("run", "no-train.yaml", "--dry-run", ok=False).output
    assert "'train' section" in out
    (workdir / "lora.yaml").write_text(ROUNDS.replace("lora: false", "lora: true"))
    out = kdpipe("run", "lora.yaml", "--dry-run").output
    assert out.count("--merge") == 3  # the train step and each round: the next round starts from the merge
    (workdir / "zero.yaml").write_text(ROUNDS.replace("fraction: 0.5", "fraction: 0"))
    out = kdpipe("run", "zero.yaml", "--dry-run").output
    assert "round1_generate" not in out and "round2_train" in out and "7 step(s)" in out
    (workdir / "cross.yaml").write_text(ROUNDS.replace("lora: false", "lora: false\n  cross_tokenizer: true"))
    out = kdpipe("run", "cross.yaml", "--dry-run", ok=False).output
    assert "cross_tokenizer" in out and "student's own tokens" in out
    (workdir / "labels.yaml").write_text(ROUNDS + 'labels:\n  "@round2_train": on-policy x2\n')
    assert "on-policy x2" not in kdpipe("run", "labels.yaml", "--dry-run").output  # dry-run: no table
    from kdpipe.stages.run import plan

    assert plan("labels.yaml").labels["runs/rr/round-2/train"] == "on-policy x2"


def test_generate_fraction_option_is_checked(workdir):
    result = kdpipe("generate", "--model", "m", "--dataset", "kdpipe:arithmetic", "--output", "o.jsonl",
                    "--fraction", 0, ok=False)
    assert result.exit_code != 0 and "--fraction must be in (0, 1]" in result.output


def test_fraction_selection_is_seeded_sized_and_ordered():
    from kdpipe.data.sources import Example, Selection
    from kdpipe.stages.generate import choose_fraction

    sel = Selection([Example(str(i), {"x": i}) for i in range(10)], "d", ["x"], "f")
    a, b = choose_fraction(sel, 0.25, 1), choose_fraction(sel, 0.25, 2)
    assert len(a.examples) == 3  # ceil(2.5)
    assert [e.id for e in a.examples] == sorted((e.id for e in a.examples), key=int)
    assert [e.id for e in choose_fraction(sel, 0.25, 1).examples] == [e.id for e in a.examples]
    assert [e.id for e in a.examples] != [e.id for e in b.examples] and a.fingerprint != sel.fingerprint
    assert choose_fraction(sel, 1.0, 1) is sel


def test_student_with_other_tokens_is_refused(workdir):
    from kdpipe.stages.rounds import check_tokenizers

    for name, vocab in (("t", 300), ("s", 280)):
        kdpipe("init-model", "--output", name, "--train-tokenizer-on", "kdpipe:arithmetic",
               "--vocab-size", vocab, "--hidden-size", 32, "--layers", 1, "--heads", 1, "--kv-heads", 1)
    check_tokenizers("t", "t")
    with pytest.raises(KdpipeError, match="different tokenizers.*student's own tokens"):
        check_tokenizers("t", "s")
