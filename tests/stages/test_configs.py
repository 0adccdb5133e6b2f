"""Every config in configs/ loads, validates and plans (--dry-run) without loading a model or data."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import kdpipe

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_published_configs_are_there():
    names = {p.name for p in CONFIGS}
    for want in ("demo.yaml", "imdb-qwen3.yaml", "imdb-qwen3-think.yaml", "sst2-deepseek.yaml", "guanaco-qwen3.yaml",
                 "alpaca-qwen25-fkl.yaml", "alpaca-qwen25-rkl.yaml", "alpaca-qwen25-skew-fkl.yaml",
                 "alpaca-qwen25-skew-rkl.yaml", "arithmetic-qwen25.yaml", "gpt2-custom-student.yaml"):
        assert want in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_plans(path, tmp_path, monkeypatch):
    from kdpipe.stages import run

    monkeypatch.chdir(tmp_path)  # nothing of the repo's runs/ or cache/ changes the plan
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: the first line should say what hardware it needs"
    p = run.plan(path)
    assert p.steps
    out = kdpipe("run", str(path), "--dry-run").output
    assert f"{len(p.steps)} step(s)" in out
    assert "[error]" not in out, out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_alpaca_variants_share_one_base_and_differ_only_in_the_loss():
    from kdpipe.stages import run

    plans = {loss: run.plan(Path(CONFIGS[0].parent) / f"alpaca-qwen25-{loss}.yaml")
             for loss in ("fkl", "rkl", "skew-fkl", "skew-rkl")}
    for loss, p in plans.items():
        train = dict((s.name, c) for s, c in p.steps)["train"]
        assert train.loss == loss and train.alpha == 0.5 and train.temperature == 2 and train.skew == 0.1
        assert train.batch_size * train.grad_accum == 32 and train.lr == 5e-4 and train.epochs == 3
