"""A local file cached as held-out data, and evaluate's note only when a held-out cache overlaps the training
cache (issue 14, item 17)."""

from __future__ import annotations

import hashlib
import json

from helpers import run_cli

from kdpipe.data import arithmetic

NOTE = "fidelity on training data flatters a student"


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n" for r in rows))
    return path


def cache(world, data, folder, *extra):
    run_cli("cache-teacher", "--model", world.teacher, "--dataset", data, "--template", "arithmetic", "--top-k", 4,
            "--cache", folder, *extra)
    return json.loads((folder / "manifest.json").read_text())


def test_heldout_file_is_recorded_and_evaluate_notes_only_a_real_overlap(world, tmp_path):
    rows = arithmetic.generate("train")[:28]
    train = write_rows(tmp_path / "train.jsonl", rows[:16])
    test = write_rows(tmp_path / "test.jsonl", rows[16:24])
    mixed = write_rows(tmp_path / "mixed.jsonl", rows[12:20])  # 4 training examples among 8
    cache(world, train, tmp_path / "c-train")
    manifest = cache(world, test, tmp_path / "c-test", "--heldout")
    assert manifest["dataset"]["heldout"] is True
    assert manifest["dataset"]["file"] == {"path": str(test.resolve()),
                                           "sha256": hashlib.sha256(test.read_bytes()).hexdigest()}
    cache(world, mixed, tmp_path / "c-mixed", "--heldout")
    run = tmp_path / "run"
    run_cli("train-student", "--cache", tmp_path / "c-train", "--model", world.student, "--output", run, "--full",
            "--max-steps", 1)

    def evaluate(held_out, model=run):
        return run_cli("evaluate", "--model", model, "--cache", held_out, "--dataset", "kdpipe:arithmetic", "--limit", 2,
                       "--task", "perplexity", "--no-plot", "--output", tmp_path / "eval").output

    # the same ids (train-0 ...) in both files, other examples: nothing to say
    assert NOTE not in evaluate(tmp_path / "c-test")
    assert (f"note: 4 of the 8 examples of cache {tmp_path / 'c-mixed'} are also in {tmp_path / 'c-train'}, the "
            f"training cache of a run evaluated here; {NOTE}") in evaluate(tmp_path / "c-mixed")
    # a plain model folder (no run to compare with): an unmarked training-split cache gets the note and the way out
    assert (f"note: cache {tmp_path / 'c-train'} is of training data as far as its manifest says (split=train, "
            f"part=all); {NOTE}. A separate test file: cache it with --heldout") in evaluate(tmp_path / "c-train",
                                                                                           world.student)
    assert NOTE not in evaluate(tmp_path / "c-test", world.student)
