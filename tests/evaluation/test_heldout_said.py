"""Issue 29 item 14: `cache info` on a --heldout cache says held out (not "[train, part all]"), results.json
records whether the evaluated data is held out and what says so, and classify's progress bar counts examples
(not one per label)."""

from __future__ import annotations

import json

from helpers import run_cli, write_jsonl

from kdpipe.data import arithmetic

REVIEWS = [{"text": "a great film", "label": "positive"}, {"text": "boring and far too long", "label": "negative"},
           {"text": "terrible plot", "label": "negative"}]


def test_a_heldout_cache_and_its_file_are_said_to_be_held_out(world, tmp_path):
    rows = arithmetic.generate("train")[:6]
    test = write_jsonl(tmp_path / "test.jsonl", [{"instruction": r["instruction"], "output": r["output"]} for r in rows])
    cache = tmp_path / "c-test"
    run_cli("cache-teacher", "--model", world.teacher, "--dataset", test, "--template", "arithmetic", "--top-k", 4,
            "--device", "cpu", "--cache", cache, "--heldout")
    info = run_cli("cache", "info", cache).output
    assert f"{test} [held out (--heldout)]" in info and "[train, part all]" not in info
    assert "kdpipe:arithmetic [train, part all]" in run_cli("cache", "info", world.cache).output

    def evaluate(*extra):
        run_cli("evaluate", "--model", world.student, "--template", "arithmetic", "--task", "perplexity", "--limit", 4,
                "--device", "cpu", "--no-plot", "--output", tmp_path / "eval", *extra)
        return json.loads((tmp_path / "eval" / "results.json").read_text())

    results = evaluate("--dataset", test, "--cache", cache)
    assert results["data"]["heldout"] is True and results["cache_heldout"] is True
    assert results["data"]["heldout_by"] == f"the --cache {cache} of this file was cached with --heldout"
    results = evaluate("--dataset", "kdpipe:arithmetic", "--part", "heldout", "--heldout-fraction", 0.5)
    assert results["data"]["heldout_by"] == "part=heldout of split train (fraction 0.5, seed 0)"
    results = evaluate("--dataset", test)  # nothing says this file is held out
    assert results["data"]["heldout"] is False and results["data"]["heldout_by"] is None


def test_the_classify_progress_bar_counts_examples(world, tmp_path, monkeypatch):
    import kdpipe.evaluation.scoring

    bars = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(kdpipe.evaluation.scoring, "tqdm", Bar)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    run_cli("evaluate", "--model", world.student, "--dataset", reviews, "--template", "sentiment", "--task", "classify",
            "--batch-size", 2, "--device", "cpu", "--no-plot", "--output", tmp_path / "eval")
    (bar,) = [b for b in bars if b.desc.endswith("classify")]
    assert (bar.total, bar.n) == (3, 3)  # 3 examples, 2 labels scored for each
