"""A cache written by the previous kdpipe (6b890b6, before the typed manifest, rank-coded ids and the stage
interface) still loads, verifies and trains to the same losses.

tests/assets/v0 was written by that version (the script is in its losses.json `written_by`): a compact and a plain
top-k cache of 48 kdpipe:arithmetic rows (k = 8, two shards each), the tiny student they were written for, and
the losses of 6 full-model steps of that version's train-student on each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parents[1] / "assets" / "v0"
EXPECTED = json.loads((DATA / "losses.json").read_text())


@pytest.mark.parametrize("encoding", ["compact", "plain"])
def test_previous_versions_cache_trains_to_the_same_losses(tmp_path, encoding):
    from kdpipe.cache.verified import open_checked
    from kdpipe.stages import train_student

    cache = tmp_path / f"cache-{encoding}"
    shutil.copytree(DATA / f"cache-{encoding}", cache)  # the check writes its record beside the shards
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    opened = open_checked(str(cache))
    assert opened.k == 8 and sum(1 for _ in opened.iter_examples()) == 48
    options = EXPECTED["options"]
    cfg = train_student.TrainStudentConfig(cache=str(cache), model=str(DATA / "student"),
                                           output=str(tmp_path / "run"), save_steps=100, **options)
    record = train_student.run(cfg, "test")
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert losses == pytest.approx(EXPECTED["losses"][encoding], rel=1e-6, abs=1e-7)
    assert all((cache / name).read_bytes() == data for name, data in before.items())  # nothing rewritten
