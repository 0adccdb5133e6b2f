"""Two `kdpipe evaluate` runs into one --output: the second fails at once while the first runs, as a second
training run into one run folder does (issue 29, item 6). Before the lock both reported success and only one
result survived. Sequential reruns into the same folder keep working."""

from __future__ import annotations

import json

from helpers import expect_error, run_cli

from kdpipe.evaluation import specs


def evaluate(model, out, seed: int) -> list[object]:
    return ["evaluate", "--model", model, "--dataset", "kdpipe:arithmetic", "--split", "test", "--limit", 4,
            "--task", "perplexity", "--device", "cpu", "--no-plot", "--seed", seed, "--output", out]


def test_a_second_evaluation_into_the_same_output_is_refused_while_the_first_runs(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    second = {}
    load = specs.load_model

    def load_and_start_another(*args, **kwargs):  # B starts while A is loading its model
        if not second:
            second["result"] = expect_error(*evaluate(tiny_model_dir, out, 2),
                                            match=f"another kdpipe run is writing to {out} (its .lock is held)")
        return load(*args, **kwargs)

    monkeypatch.setattr(specs, "load_model", load_and_start_another)
    run_cli(*evaluate(tiny_model_dir, out, 1))
    assert second and "--seed 1 " in json.loads((out / "results.json").read_text())["command"]
    monkeypatch.setattr(specs, "load_model", load)
    run_cli(*evaluate(tiny_model_dir, out, 3))  # a rerun after the first finished: as before, it replaces the results
    assert "--seed 3 " in json.loads((out / "results.json").read_text())["command"]
