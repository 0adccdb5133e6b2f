"""Templates and the loss mask: the distilled positions are exactly the completion, for each template."""

from __future__ import annotations

import pytest

from kdpipe.data.sources import DataConfig, Example
from kdpipe.data.templates import get_template
from kdpipe.data.tokenize import tokenize_examples
from kdpipe.errors import KdpipeError


def trained_text(tokenizer, example: dict, template: str, **cfg) -> tuple[str, str]:
    """(the whole tokenized text, the text of the tokens whose prediction is distilled)."""
    config = DataConfig(dataset="x", template=template, **cfg)
    (item,), _ = tokenize_examples([Example("e0", example)], get_template(template), tokenizer, config)
    return tokenizer.decode(item.input_ids), tokenizer.decode(item.input_ids[item.positions + 1])


def test_alpaca_with_and_without_input(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    full, trained = trained_text(tiny_tokenizer, {"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca")
    assert trained == "5" + eos
    assert "### Input:\n2 and 3\n\n### Response:\n5" in full
    full, trained = trained_text(tiny_tokenizer, {"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
    assert trained == "hi" + eos and "### Input" not in full


def test_sentiment_maps_integer_labels(tiny_tokenizer):
    full, trained = trained_text(tiny_tokenizer, {"text": "great film", "label": 1}, "sentiment")
    assert trained == " positive" + tiny_tokenizer.eos_token
    assert full.startswith("Classify the sentiment of this review as negative or positive.")
    _, trained = trained_text(tiny_tokenizer, {"text": "bad", "label": "negative"}, "sentiment")
    assert trained == " negative" + tiny_tokenizer.eos_token


def test_sentiment_think_trains_the_rationale(tiny_tokenizer):
    example = {"text": "boring", "label": 0, "rationale": "The plot is boring."}
    full, trained = trained_text(tiny_tokenizer, example, "sentiment-think")
    assert trained == "<think>\nThe plot is boring.\n</think>\nSentiment: negative" + tiny_tokenizer.eos_token
    assert "Think step by step" in full


def test_guanaco_trains_every_assistant_turn(tiny_tokenizer):
    text = "### Human: Hello### Assistant: Hi there### Human: How are you?### Assistant: Fine"
    full, trained = trained_text(tiny_tokenizer, {"text": text}, "guanaco")
    assert full == text + tiny_tokenizer.eos_token
    assert trained == " Hi there Fine" + tiny_tokenizer.eos_token


def test_distill_prompt_covers_every_token(tiny_tokenizer):
    full, trained = trained_text(tiny_tokenizer, {"instruction": "Add", "output": "5"}, "alpaca", distill_prompt=True)
    first = tiny_tokenizer.decode(tiny_tokenizer(full, add_special_tokens=False)["input_ids"][:1])
    assert trained == full[len(first):]


def test_chat_template_masks_all_but_assistant(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
    full, trained = trained_text(tok, {"messages": messages}, "chat")
    assert full == "<user>Hi<|endoftext|><assistant>Hello<|endoftext|><user>Bye<|endoftext|><assistant>See you<|endoftext|>"
    assert trained == "Hello<|endoftext|>See you<|endoftext|>"
    with pytest.raises(KdpipeError, match="chat template"):
        trained_text(tiny_tokenizer, {"instruction": "a", "output": "b"}, "chat")


# SmolLM2's template: ChatML, a default system turn when the conversation has none
CHATML = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "<|im_start|>system\nYou are SmolLM<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chatml(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def test_chat_answer_ends_at_its_end_of_turn_without_a_default_system_turn(chatml):
    from kdpipe.data.templates import turn_end

    full, trained = trained_text(chatml, {"instruction": "Say hi", "output": "Hi."}, "chat")
    assert full == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>"  # no "SmolLM"
    assert trained == "Hi.<|im_end|>"  # the newline after the end token is not trained (nor kept, at the end)
    full, _ = trained_text(chatml, {"instruction": "Say hi", "output": "Hi.", "system": "Be brief."}, "chat")
    assert full.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert turn_end(chatml) == "<|im_end|>"
    full, trained = trained_text(chatml, {"text": "great film", "label": 1}, "sentiment-chat")
    assert trained == "positive<|im_end|>"
    assert full.endswith("Answer with one word.\n\nReview: great film<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>")


def test_chat_template_file_and_label_slots(chatml, tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text('prompt: "Q: {question}"\ncompletion: "{label}"\nchat: true\n')
    full, trained = trained_text(chatml, {"question": "2+2?", "label": 1}, str(path))
    assert full == "<|im_start|>user\nQ: 2+2?<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>"
    assert trained == "positive<|im_end|>"
    assert get_template(str(path)).label_slot and get_template("sentiment-chat").label_slot
    assert not get_template("chat").label_slot and not get_template("alpaca").label_slot


def test_user_template_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text('prompt: "Q: {question}\\nA:"\ncompletion: " {answer}"\nadd_eos: false\n')
    full, trained = trained_text(tiny_tokenizer, {"question": "2+2?", "answer": "4"}, str(path))
    assert full == "Q: 2+2?\nA: 4" and trained == " 4"
    with pytest.raises(KdpipeError, match="field 'answer' required by template .*qa.yaml is missing"):
        trained_text(tiny_tokenizer, {"question": "2+2?"}, str(path))


def test_bad_template_file_and_unknown_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('prompt: "{question"\ncompletion: "x"\n')
    with pytest.raises(KdpipeError, match="bad format string"):
        get_template(str(bad))
    bad.write_text('prompt: "x"\n')
    with pytest.raises(KdpipeError, match="must have 'prompt' and 'completion'"):
        get_template(str(bad))
    with pytest.raises(KdpipeError, match="unknown template 'alpacca'"):
        get_template("alpacca")


def test_empty_field_is_an_error_naming_the_example(tiny_tokenizer):
    with pytest.raises(KdpipeError, match="example 'e0': field 'output' required by template alpaca is empty"):
        trained_text(tiny_tokenizer, {"instruction": "x", "output": "  "}, "alpaca")


def truncate(tokenizer, policy: str, max_length: int = 30):
    examples = [Example("long", {"text": "great film " * 40, "label": 1}), Example("short", {"text": "ok", "label": 1})]
    cfg = DataConfig(dataset="x", template="sentiment", max_length=max_length, truncation=policy)
    return tokenize_examples(examples, get_template("sentiment"), tokenizer, cfg)


def test_truncate_prompt_keeps_the_completion(tiny_tokenizer):
    items, report = truncate(tiny_tokenizer, "truncate-prompt")
    assert [i.id for i in items] == ["long", "short"] and len(items[0].input_ids) == 30
    assert tiny_tokenizer.decode(items[0].input_ids[items[0].positions + 1]) == " positive" + tiny_tokenizer.eos_token
    assert dict(report.counts) == {"truncated": 1}


def test_truncate_cuts_the_end(tiny_tokenizer):
    cfg = DataConfig(dataset="x", template="text", max_length=10, truncation="truncate")
    (item,), report = tokenize_examples([Example("t", {"text": "one two three " * 10})], get_template("text"), tiny_tokenizer, cfg)
    full = tiny_tokenizer("one two three " * 10, add_special_tokens=False)["input_ids"]
    assert item.input_ids.tolist() == full[:10] and item.positions.tolist() == list(range(9))
    assert dict(report.counts) == {"truncated": 1}


def test_truncation_that_leaves_no_target_is_a_counted_skip(tiny_tokenizer):
    items, report = truncate(tiny_tokenizer, "truncate")
    assert [i.id for i in items] == ["short"]
    assert dict(report.counts) == {"skipped (completion truncated away)": 1}


def test_skip_policy_is_counted(tiny_tokenizer):
    items, report = truncate(tiny_tokenizer, "skip")
    assert [i.id for i in items] == ["short"] and dict(report.counts) == {"skipped (too long)": 1}


def test_truncation_error_names_the_example(tiny_tokenizer):
    cfg = DataConfig(dataset="x", template="text", max_length=5, truncation="error")
    with pytest.raises(KdpipeError, match="example 'long' has .* tokens, more than max_length=5"):
        tokenize_examples([Example("long", {"text": "a b c d e f g h i j"})], get_template("text"), tiny_tokenizer, cfg)


def test_template_attributes_say_how_evaluate_uses_it(tmp_path):
    """Per-template behaviour is read from attributes, never from the template's name."""
    arithmetic, sentiment = get_template("arithmetic"), get_template("sentiment")
    think, chat = get_template("sentiment-think"), get_template("chat")
    assert arithmetic.default_tasks == ("exact-match", "perplexity") and arithmetic.checker == "arithmetic"
    assert sentiment.default_tasks == ("classify",) and not sentiment.generates_label
    assert think.generates_label and think.answer_tokens == 256 and think.lists_labels
    assert not chat.special_prefix and chat.renders_with_tokenizer and not chat.add_eos
    file = tmp_path / "mine.yaml"
    file.write_text("prompt: 'Q: {question}\\nA:'\ncompletion: ' {answer}'\n")
    mine = get_template(str(file))
    assert (mine.default_tasks, mine.checker, mine.special_prefix, mine.generates_label) == (
        ("perplexity",), "exact", True, False)


def test_a_chat_tokenizer_without_a_pad_token_pads_with_its_end_of_turn(tiny_tokenizer, tmp_path):
    from kdpipe.models import load_tokenizer

    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_token_id == loaded.eos_token_id
    _full, trained = trained_text(loaded, {"instruction": "Say hi", "output": "Hi."}, "chat")
    assert trained == "Hi.<|im_end|>"
