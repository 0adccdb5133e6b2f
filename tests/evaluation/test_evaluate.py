"""`kdpipe evaluate` on tiny models: label scoring and perplexity against the model's own log-probs,
padding invariance, adapter == merged, fidelity on a cache, the CLI end to end, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kdpipe, write_jsonl

REVIEWS = [
    {"text": "a great film, wonderful acting", "label": 1},
    {"text": "boring and far too long", "label": 0},
    {"text": "terrible plot", "label": "negative"},
    {"text": "The quick brown fox jumps over the lazy dog. Hello world, how are you today? great", "label": "positive"},
    {"text": "far too long, a terrible plot and boring acting", "label": 0},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A tiny base model, a small student, a LoRA adapter on the base and its merge, a cache, data files."""
    from peft import LoraConfig, get_peft_model

    from kdpipe import tiny
    from kdpipe.models import load_model
    from kdpipe.stages import cache_teacher

    root = tmp_path_factory.mktemp("evaluate")
    student = root / "student"
    tiny.init_model(student, tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=5)
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(str(tiny_model_dir), "fp32", "cpu"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter, merged = root / "adapter", root / "merged"
    peft_model.save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    tiny_tokenizer.save_pretrained(merged)
    cache = root / "cache"
    cache_teacher.run(cache_teacher.CacheTeacherConfig(model=str(tiny_model_dir), dataset="kdpipe:arithmetic", split="test",
                                                       limit=12, top_k=8, cache=str(cache), device="cpu"), "test")
    reviews = write_jsonl(root / "reviews.jsonl", REVIEWS)
    return {"root": root, "base": Path(tiny_model_dir), "student": student, "adapter": adapter, "merged": merged,
            "cache": cache, "reviews": reviews, "tokenizer": tiny_tokenizer}


def _config(**kw):
    from kdpipe.stages.evaluate import EvaluateConfig

    kw.setdefault("plot", False)
    return EvaluateConfig(**kw)


def _quiet(_msg: str) -> None:
    pass


def _model(path):
    from kdpipe.models import load_model

    return load_model(str(path), "fp32", "cpu")


# ---------------------------------------------------------------- against the model's own log-probs


def test_label_scores_are_the_models_own_logprobs(env):
    from kdpipe.data.sources import load_examples
    from kdpipe.data.templates import get_template
    from kdpipe.evaluation.specs import ModelSpec
    from kdpipe.evaluation.tasks import classify

    tok, model = env["tokenizer"], _model(env["base"])
    cfg = _config(dataset=str(env["reviews"]), template="sentiment", batch_size=3)
    examples = load_examples(cfg).examples
    template = get_template("sentiment")
    out, preds = classify(model, tok, examples, template, cfg, ModelSpec("m", "m", "model", "m"))
    gold = ["positive", "negative", "negative", "positive", "negative"]
    for e, pred in zip(examples, preds):
        prompt = "Classify the sentiment of this review as negative or positive.\n\nReview: " + e.fields["text"] + "\nSentiment:"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for name in ("negative", "positive"):
            c_ids = tok(" " + name, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([p_ids + c_ids])).logits[0].double().log_softmax(-1)
            expected = sum(logp[len(p_ids) - 1 + j, c].item() for j, c in enumerate(c_ids))
            assert pred["scores"][name] == pytest.approx(expected, abs=1e-4)
        assert pred["predicted"] == max(pred["scores"], key=pred["scores"].get)
    predicted = [p["predicted"] for p in preds]
    assert [p["gold"] for p in preds] == gold
    assert out["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, predicted)) / 5)


def test_perplexity_is_unchanged_by_padding_and_matches_unpadded_logprobs(env):
    from kdpipe.data.sources import DataConfig, load_examples
    from kdpipe.data.templates import get_template
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.evaluation import scoring

    tok, model = env["tokenizer"], _model(env["base"])
    cfg = DataConfig(dataset=str(env["reviews"]), template="sentiment")
    items, _ = tokenize_examples(load_examples(cfg).examples, get_template("sentiment"), tok, cfg)
    cfg2 = DataConfig(dataset="kdpipe:arithmetic", split="test", limit=6)
    items += tokenize_examples(load_examples(cfg2).examples, get_template("arithmetic"), tok, cfg2)[0]
    lengths = {len(t.input_ids) for t in items}
    assert max(lengths) > 2 * min(lengths)  # real padding in a shared batch
    seqs, pos = [t.input_ids for t in items], [t.positions for t in items]
    alone = scoring.target_logprobs(model, seqs, pos, tok.pad_token_id, batch_size=1)
    padded = scoring.target_logprobs(model, seqs, pos, tok.pad_token_id, batch_size=64)
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    expected = []
    for t in items:
        with torch.no_grad():
            logp = model(torch.tensor([t.input_ids.tolist()])).logits[0].double().log_softmax(-1)
        expected += [logp[p, t.input_ids[p + 1]].item() for p in t.positions]
    np.testing.assert_allclose(padded, expected, atol=1e-5)
    assert len(padded) == sum(len(p) for p in pos)  # only trained tokens, never padding


# ---------------------------------------------------------------- whole runs


def test_adapter_on_its_base_equals_the_merged_model(env):
    from kdpipe.stages import evaluate

    cfg = _config(model=[str(env["adapter"]), str(env["merged"])], dataset="kdpipe:arithmetic", split="test", limit=16,
                  cache=str(env["cache"]), dtype="fp32", device="cpu", output=str(env["root"] / "eval-merge"))
    results = evaluate.run(cfg, echo=_quiet)
    adapter, merged = results["models"]
    assert adapter["kind"] == "adapter" and adapter["base"] == str(env["base"]) and merged["kind"] == "model"
    assert set(adapter["metrics"]) == set(merged["metrics"]) >= {"exact-match/exact_match", "perplexity/perplexity",
                                                                  "fidelity/kl", "fidelity/top1_agreement"}
    for key, value in adapter["metrics"].items():
        assert merged["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_fidelity_of_the_teacher_and_of_a_student_computed_independently(env):
    from kdpipe.cache import open_cache
    from kdpipe.stages import evaluate

    cfg = _config(model=[str(env["base"]), str(env["student"])], cache=str(env["cache"]), batch_size=5,
                  output=str(env["root"] / "eval-fid"))
    teacher, student = evaluate.run(cfg, echo=_quiet)["models"]
    assert teacher["metrics"]["fidelity/kl"] < 1e-3  # float16 log-probs in the cache
    assert teacher["metrics"]["fidelity/top1_agreement"] == 1.0
    assert teacher["metrics"]["fidelity/topk_recall"] == 1.0
    model = _model(env["student"])
    kls, agree, recall = [], [], []
    for ex in open_cache(env["cache"]).iter_examples():
        with torch.no_grad():
            logp = model(torch.tensor([ex.input_ids.tolist()])).logits[0].double().log_softmax(-1).numpy()
        for j, t in enumerate(ex.positions):
            ids, tp = ex.targets.topk_ids[j], np.exp(ex.targets.topk_logprobs[j].astype(np.float64))
            p = np.append(tp, ex.targets.tail_mass[j])
            p /= p.sum()
            q_top = np.exp(logp[t, ids])
            q = np.append(q_top, 1 - q_top.sum())
            kls.append(float(np.sum(p * np.log(p / q))))
            agree.append(int(np.argmax(logp[t]) == ids[0]))
            recall.append(len(set(np.argsort(-logp[t])[:8]) & set(ids)) / 8)
    m = student["metrics"]
    assert m["fidelity/positions"] == len(kls)
    assert m["fidelity/kl"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert m["fidelity/top1_agreement"] == pytest.approx(np.mean(agree))
    assert m["fidelity/topk_recall"] == pytest.approx(np.mean(recall))


def test_cli_end_to_end(env, tmp_path):
    out = tmp_path / "eval"
    result = kdpipe("evaluate", "--model", env["base"], "--model", env["student"], "--dataset", "kdpipe:arithmetic",
                    "--split", "test", "--limit", 10, "--cache", env["cache"], "--output", out, "--seed", 3)
    assert _header(result) == ["metric", "teacher", "student"]
    for row in ("exact-match/exact_match", "perplexity/perplexity", "fidelity/kl", "fidelity/ece"):
        assert row in result.output
    data = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in data["models"]] == ["teacher", "student"]
    assert "fidelity/kl" in data["definitions"] and "kdpipe evaluate" in data["command"]
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "metric,teacher,student" and len(rows) == 1 + len(evaluate_keys(data))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 10
    pytest.importorskip("matplotlib")
    assert (out / "metrics.png").stat().st_size > 0


def test_classify_by_generation_reports_unparsed_answers(env, tmp_path):
    result = kdpipe("evaluate", "--model", env["base"], "--dataset", env["reviews"], "--template", "sentiment",
                    "--generate", "--max-new-tokens", 3, "--output", tmp_path, "--no-plot")
    assert "classify/unparsed" in result.stdout
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(REVIEWS) and all("output" in p for p in preds)
    data = json.loads((tmp_path / "results.json").read_text())
    unparsed = sum(p["predicted"] is None for p in preds) / len(preds)
    assert data["models"][0]["metrics"]["classify/unparsed"] == pytest.approx(unparsed)


def _header(result) -> list[str]:
    return next(line.split() for line in result.stdout.splitlines() if line.startswith("metric "))


def evaluate_keys(data):
    keys = []
    for m in data["models"]:
        keys += [k for k in m["metrics"] if k not in keys]
    return keys


def test_default_is_the_latest_run_its_base_and_its_teacher(env, workdir):
    run = workdir / "runs" / "distilled"
    shutil.copytree(env["student"], run)
    record = {"kind": "train-student", "status": "complete", "updated": "2030-01-01T00:00:00",
              "config": {"model": str(env["student"]), "cache": str(env["cache"])},
              "log_history": [{"loss": 3.0, "step": 1, "learning_rate": 1e-3}, {"loss": 2.5, "step": 2, "learning_rate": 5e-4}]}
    (run / "kdpipe_run.json").write_text(json.dumps(record))
    older = workdir / "runs" / "older"
    older.mkdir()
    (older / "kdpipe_run.json").write_text(json.dumps({**record, "updated": "2020-01-01T00:00:00"}))
    unfinished = workdir / "runs" / "unfinished"
    unfinished.mkdir()
    (unfinished / "kdpipe_run.json").write_text(json.dumps({**record, "status": "running", "updated": "2031-01-01"}))
    result = kdpipe("evaluate", "--limit", 6, "--no-plot")
    assert _header(result) == ["metric", "distilled", "student", "teacher"]
    data = json.loads((run / "eval" / "results.json").read_text())
    assert [m["role"] for m in data["models"]] == ["student", "base", "teacher"]
    assert data["data"]["dataset"] == "kdpipe:arithmetic" and data["data"]["split"] == "test"
    assert data["data"]["tasks"] == ["exact-match", "perplexity"]
    pytest.importorskip("matplotlib")
    kdpipe("evaluate", "--model", run, "--limit", 4, "--task", "perplexity")
    assert (run / "eval" / "training-distilled.png").stat().st_size > 0


# ---------------------------------------------------------------- bad input


def _fails(*args, match: str):
    result = kdpipe(*args, ok=False)
    assert result.exit_code == 2, result.output
    assert match in result.output and "Traceback" not in result.output
    return result


def test_bad_input(env, workdir, monkeypatch):
    base = env["base"]
    _fails("evaluate", "--model", base, "--dataset", "kdpipe:arithmetic", "--task", "accuracy", match="unknown task 'accuracy'")
    bad = write_jsonl(workdir / "bad.jsonl", REVIEWS + [{"text": "so-so", "label": "neutral"}])
    _fails("evaluate", "--model", base, "--dataset", bad, "--template", "sentiment",
           match="label 'neutral', which is not among the label names")
    _fails("evaluate", "--model", base, "--dataset", env["reviews"], "--template", "sentiment", "--label-names", "neg",
           match="label 1 has no name")
    _fails("evaluate", "--model", workdir / "missing", "--dataset", "kdpipe:arithmetic", match="does not exist")
    _fails("evaluate", "--model", "nobody/no-such-model", "--dataset", "kdpipe:arithmetic", match="could not load the tokenizer")
    broken = workdir / "broken"
    shutil.copytree(base, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    _fails("evaluate", "--model", broken, "--dataset", "kdpipe:arithmetic", "--limit", 2, match="could not load the model")
    _fails("evaluate", "--model", base, "--task", "perplexity", match="needs data")
    _fails("evaluate", "--model", base, "--dataset", "kdpipe:arithmetic", "--checker", "nope.py:f", "--limit", 2,
           match="checker file nope.py does not exist")
    _fails("evaluate", match="no finished run under runs/")

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    _fails("evaluate", "--model", base, "--lm-eval", "ifeval", match="pip install 'kdpipe[lm-eval]'")


def test_lm_eval_error_messages():
    from kdpipe.evaluation.harness import lm_eval_error

    offline = ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")
    assert "could not get the data of hellaswag" in lm_eval_error(offline, ["hellaswag"])
    missing = ModuleNotFoundError("No module named 'langdetect'", name="langdetect")
    assert "need the Python package 'langdetect'" in lm_eval_error(missing, ["ifeval"])
    assert lm_eval_error(ValueError("boom"), ["x"]) == "lm-eval failed on x: ValueError: boom"


def test_lm_eval_offline_data_is_a_clear_error(env, tmp_path):
    """Runs only where lm-eval is installed: with the hub offline, the data cannot be reached."""
    pytest.importorskip("lm_eval")
    result = _fails("evaluate", "--model", env["base"], "--lm-eval", "hellaswag", "--limit", 2, "--output", tmp_path,
                    match="could not get the data of hellaswag")
    assert "offline mode is on" in result.output
