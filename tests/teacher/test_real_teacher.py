"""The real teacher, SmolLM2-135M-Instruct (the `smollm2` fixture: PyPI wheel -> model folder, once per
machine), through the `kdpipe` command: fetch, show-example, cache-teacher with a chat template against
transformers' own log-softmax, evaluate's classify / exact-match / perplexity on a chat model, the GGUF
file loaded directly, and bad GGUF input. Cheap: a few short rows, one forward pass at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import expect_error, kdpipe, write_jsonl

from kdpipe.cache import open_cache
from kdpipe.fetch import GGUF_FOLDER, KNOWN

K = 8
REVIEWS = [{"text": "A wonderful, moving film.", "label": 1}, {"text": "Dull and far too long.", "label": 0},
           {"text": "I loved every minute of it.", "label": 1}]
USER = "Classify the sentiment of this review as negative or positive. Answer with one word.\n\nReview: {}"


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "reviews.jsonl", REVIEWS)


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' own model, fp32: the independent reference (a forward per example)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()

    def log_softmax(input_ids) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long)[None]).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    return log_softmax


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, smollm2, reviews) -> Path:
    folder = tmp_path_factory.mktemp("c") / "reviews"
    kdpipe("cache-teacher", "--model", smollm2, "--dataset", reviews, "--template", "sentiment-chat",
           "--top-k", K, "--cache", folder, "--dtype", "fp32", "--batch-size", 1, "--max-length", 64)
    return folder


def test_fetch_model_rerun_is_a_noop(smollm2):
    result = kdpipe("fetch-model", "smollm2-135m-instruct", "--output", smollm2)
    assert "nothing to do" in result.output
    record = json.loads((smollm2 / "kdpipe_source.json").read_text())
    assert record["gguf_sha256"] == KNOWN["smollm2-135m-instruct"].sha256
    assert record["architecture"] == "LlamaForCausalLM" and record["parameters"] == 134_515_008
    assert (smollm2 / "chat_template.jinja").is_file()


def test_show_example_marks_the_answer_and_its_end_of_turn(smollm2, reviews):
    out = kdpipe("show-example", "--model", smollm2, "--dataset", reviews, "--template", "sentiment-chat",
                 "--row", 1).output
    rendered = out.split("rendered:\n", 1)[1].split("\n\n  pos", 1)[0]
    # the model's own chat format, no default system prompt, the answer ends with its end-of-turn token
    assert rendered == ("<|im_start|>user\n" + USER.format("Dull and far too long.") + "<|im_end|>\n"
                        "<|im_start|>assistant\nnegative<|im_end|>")
    marked = [line.split() for line in out.splitlines() if line[5:].strip() and "  *  " in line]
    assert [(row[1], row[-1]) for row in marked] == [("17728", "'negative'"), ("2", "'<|im_end|>'")]
    assert "named SmolLM" not in out and "system" not in out
    expect_error("show-example", "--model", smollm2, "--dataset", reviews, "--row", 3,
                 match="--row 3: the selection has 3 examples")


def test_cache_equals_dense_reference_at_every_position(chat_cache, reference):
    manifest = json.loads((chat_cache / "manifest.json").read_text())
    assert manifest["template"]["name"] == "sentiment-chat"
    assert "gguf_sha256" not in manifest["teacher"]  # a model folder, not a GGUF file
    examples = list(open_cache(chat_cache).iter_examples())
    assert len(examples) == len(REVIEWS)
    for e in examples:
        assert e.labels[-1] == 2 and len(e.positions) == 2  # the label (one token here) and <|im_end|>
        ref = reference(e.input_ids)[e.positions]
        values, ids = torch.topk(ref, K, dim=-1)
        np.testing.assert_array_equal(e.targets.topk_ids, ids.numpy())
        np.testing.assert_allclose(e.targets.topk_logprobs, values.numpy(), rtol=1e-3, atol=1e-3)
        target = ref.gather(1, torch.as_tensor(e.labels, dtype=torch.long)[:, None]).squeeze(1)
        np.testing.assert_allclose(e.targets.target_logprob, target.numpy(), atol=1e-4)


def test_evaluate_classify_and_perplexity_on_the_chat_model(tmp_path, smollm2, reviews, chat_cache, reference):
    kdpipe("evaluate", "--model", smollm2, "--dataset", reviews, "--template", "sentiment-chat",
           "--task", "classify,perplexity", "--output", tmp_path / "eval", "--batch-size", 1)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    metrics = results["models"][0]["metrics"]
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    scores = [p["scores"] for p in preds if p["task"] == "classify"]
    prompt_ids = _ids(smollm2, "<|im_start|>user\n" + USER.format(REVIEWS[0]["text"])
                      + "<|im_end|>\n<|im_start|>assistant\n")
    for name in ("negative", "positive"):  # each label scored after the prompt: transformers' own sum
        label_ids = _ids(smollm2, name)
        ref = reference(prompt_ids + label_ids)
        expected = sum(float(ref[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(label_ids))
        assert scores[0][name] == pytest.approx(expected, abs=1e-3)
    assert all(s["negative"] != s["positive"] for s in scores)  # issue 29 item 13: not all alike
    gold = ["positive", "negative", "positive"]
    predicted = [max(s, key=s.get) for s in scores]
    assert metrics["classify/accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, predicted)]))
    # perplexity: the trained tokens (label and <|im_end|>) as the cache has them
    nll = [-float(r) for e in open_cache(chat_cache).iter_examples() for r in e.targets.target_logprob]
    assert metrics["perplexity/perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)
    assert metrics["perplexity/tokens"] == 6


def test_exact_match_generation_stops_at_the_end_of_turn(tmp_path, smollm2):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "What is the capital of France? Answer in one word.",
                                                "output": "Paris"}])
    kdpipe("evaluate", "--model", smollm2, "--dataset", data, "--template", "chat", "--task", "exact-match",
           "--output", tmp_path / "eval", "--max-new-tokens", 24)
    [pred] = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert pred["answer"] == "The capital of France is Paris."  # stopped at <|im_end|>, not at 24 tokens
    assert pred["reference"] == "Paris" and pred["correct"] is False


def test_classify_refuses_a_template_without_a_label_slot(smollm2, reviews):
    expect_error("evaluate", "--model", smollm2, "--dataset", reviews, "--template", "chat", "--task",
                 "classify", match="template chat has no label slot; use --template sentiment-chat")


def test_gguf_file_loads_directly_as_the_model(tmp_path, smollm2, reviews, chat_cache):
    gguf = next((smollm2 / GGUF_FOLDER).glob("*.gguf"))
    kdpipe("evaluate", "--model", gguf, "--dataset", reviews, "--template", "sentiment-chat", "--task",
           "perplexity", "--output", tmp_path / "eval", "--batch-size", 1)
    row = json.loads((tmp_path / "eval" / "results.json").read_text())["models"][0]
    assert row["gguf_sha256"] == KNOWN["smollm2-135m-instruct"].sha256 and row["gguf_file"] == str(gguf)
    # the same dequantized weights as the converted folder: the cache's perplexity
    nll = [-float(r) for e in open_cache(chat_cache).iter_examples() for r in e.targets.target_logprob]
    assert row["metrics"]["perplexity/perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)


def test_bad_gguf_input_is_refused_clearly(tmp_path, reviews):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a checkpoint")
    expect_error("cache-teacher", "--model", fake, "--dataset", reviews, "--cache", tmp_path / "c",
                 match=f"{fake} is not a GGUF file (it starts with b'not ', a GGUF file with b'GGUF')")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    expect_error("evaluate", "--model", two, "--dataset", reviews, "--task", "perplexity",
                 match="holds 2 GGUF files (a.gguf, b.gguf); pass the one to load")
    expect_error("convert-gguf", reviews, "--output", tmp_path / "m",
                 match="is a file but not a GGUF checkpoint")
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()
    expect_error("fetch-model", "smollm3", "--output", tmp_path / "m",
                 match="unknown model 'smollm3'; kdpipe fetch-model knows smollm2-135m-instruct")


def test_convert_gguf_never_overwrites(tmp_path, smollm2):
    gguf = next((smollm2 / GGUF_FOLDER).glob("*.gguf"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    expect_error("convert-gguf", gguf, "--output", tmp_path / "taken",
                 match="already exists and holds other files; choose another --output")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert "nothing to do" in kdpipe("convert-gguf", gguf, "--output", smollm2).output  # its own source


def _ids(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
