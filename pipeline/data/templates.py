"""Prompt templates: an example's fields -> text segments, each marked as trained (completion) or not.

Built in: alpaca, sentiment, sentiment-think, guanaco, chat (the tokenizer's chat template), text,
arithmetic; or a user template file (YAML with ``prompt`` and ``completion`` format strings).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.config import read_yaml
from kdpipe.errors import KdpipeError


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


Fields = dict[str, Any]

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SENTIMENT = "Classify the sentiment of this review as {choices}.\n\nReview: {text}\nSentiment:"
SENTIMENT_THINK = (
    "Classify the sentiment of this review as {choices}. Think step by step inside <think></think>, "
    "then give the answer.\n\nReview: {text}\n"
)
ARITHMETIC = "Write {instruction} as a sum of two positive numbers.\nAnswer:"


@dataclass
class Template:
    """Renders examples to segments. `required` fields must be present and non-empty.

    The attributes below `lists_labels` say how a template is used beyond rendering, so that no
    caller compares template names: what `kdpipe evaluate --task auto` runs on it, whether its
    classification is read from a generated answer, which exact-match checker judges it, whether
    the tokenizer's special prefix (a BOS) goes first, and whether rendering needs the tokenizer.
    """

    name: str
    required: tuple[str, ...]
    render_fn: Callable[[Fields, Any], list[Segment]]
    add_eos: bool = True
    label_names: tuple[str, ...] = ("negative", "positive")
    lists_labels: bool = False  # its prompt lists the label names as the choices: a label must be one of them
    default_tasks: tuple[str, ...] = ("perplexity",)  # evaluate's tasks for --task auto
    generates_label: bool = False  # classify by greedy generation (its answer reasons before the label)
    answer_tokens: int = 8  # default generation length when classifying by generation
    checker: str = "exact"  # evaluate's default --checker for exact-match
    special_prefix: bool = True  # False: the rendered text carries its own (a chat template renders its BOS)
    renders_with_tokenizer: bool = False  # rendering needs the model's tokenizer (its chat template)
    completion_field: str | None = None  # the one field its completion shows (what `kdpipe generate` fills)

    def render(self, fields: Fields, example_id: str, tokenizer: Any = None) -> list[Segment]:
        for name in self.required:
            value = fields.get(name)
            # NaN (value != value): what a gap in a CSV column gives
            if value is None or value != value or (isinstance(value, str) and not value.strip()):
                state = "missing" if name not in fields else "empty"
                raise KdpipeError(f"example '{example_id}': field '{name}' required by template {self.name} "
                                  f"is {state}")
            if not isinstance(value, (str, int, float)):
                raise KdpipeError(
                    f"example '{example_id}': field '{name}' required by template {self.name} must be text "
                    "or a number, "
                    f"not a {type(value).__name__} ({str(value)[:60]})"
                )
        if "label" in self.required:
            self._check_label(fields["label"], example_id)
        return self.render_fn({**fields, "_labels": self.label_names}, tokenizer)

    def output_field(self) -> str:
        """The field a generated completion fills; a KdpipeError for templates without a single one."""
        if self.completion_field is None:
            raise KdpipeError(
                f"template {self.name} has no single output field for kdpipe generate to fill: use alpaca, "
                "arithmetic, chat (instruction/output rows) or a template file whose completion is one "
                "field, e.g. completion: \" {answer}\"")
        return self.completion_field

    def _check_label(self, value: Any, example_id: str) -> None:
        """The label names a label: an index of label_names (1, or 1.0 from a CSV column with a gap) or,
        where the prompt lists the choices, one of the names (as evaluate requires)."""
        try:
            name = label_text(value, self.label_names)
        except KdpipeError as e:
            raise KdpipeError(f"example '{example_id}': {e.message}") from None
        if self.lists_labels and name not in self.label_names:
            raise KdpipeError(f"example '{example_id}' has the label '{name}', which is not among the label "
                              f"names {list(self.label_names)}; pass --label-names covering every label of "
                              "the data")


def label_text(value: Any, names: tuple[str, ...]) -> str:
    """An integer label as its name (``1`` or ``1.0`` -> ``positive``); a string label as it is."""
    if isinstance(value, float):
        if not value.is_integer():
            raise KdpipeError(f"label {value} is neither an integer nor a name; label_names are "
                              f"{list(names)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value).strip()
    if not 0 <= value < len(names):
        raise KdpipeError(f"label {value} has no name; label_names are {list(names)} (set label_names)")
    return names[value]


def _alpaca(f: Fields, _tok: Any) -> list[Segment]:
    prompt = ALPACA_INPUT if str(f.get("input") or "").strip() else ALPACA_NO_INPUT
    text = prompt.format(instruction=f["instruction"], input=f.get("input") or "")
    return [Segment(text, False), Segment(str(f["output"]), True)]


def _choices(names: tuple[str, ...]) -> str:
    return " or ".join(names)


def _sentiment(f: Fields, _tok: Any) -> list[Segment]:
    prompt = SENTIMENT.format(choices=_choices(f["_labels"]), text=f["text"])
    return [Segment(prompt, False), Segment(" " + label_text(f["label"], f["_labels"]), True)]


def _sentiment_think(f: Fields, _tok: Any) -> list[Segment]:
    prompt = SENTIMENT_THINK.format(choices=_choices(f["_labels"]), text=f["text"])
    label = label_text(f["label"], f["_labels"])
    answer = f"<think>\n{str(f['rationale']).strip()}\n</think>\nSentiment: {label}"
    return [Segment(prompt, False), Segment(answer, True)]


_TURN = re.compile(r"(### (?:Human|Assistant):)")


def _guanaco(f: Fields, _tok: Any) -> list[Segment]:
    """``### Human: ... ### Assistant: ...`` text: every assistant reply is trained, the rest is prompt."""
    parts = _TURN.split(str(f["text"]))
    segments, speaker = [Segment(parts[0], False)] if parts[0] else [], None
    for part in parts[1:]:
        if _TURN.fullmatch(part):
            speaker = part
            segments.append(Segment(part, False))
        elif part:
            segments.append(Segment(part, speaker == "### Assistant:"))
    if not any(s.trained for s in segments):
        raise KdpipeError(f"guanaco text has no '### Assistant:' reply: {str(f['text'])[:80]!r}")
    return segments


def _text(f: Fields, _tok: Any) -> list[Segment]:
    return [Segment(str(f["text"]), True)]


def _arithmetic(f: Fields, _tok: Any) -> list[Segment]:
    prompt = ARITHMETIC.format(instruction=f["instruction"])
    return [Segment(prompt, False), Segment(" " + str(f["output"]), True)]


def _messages(f: Fields) -> list[dict[str, str]]:
    if f.get("messages"):
        return [{"role": m["role"], "content": m["content"]} for m in f["messages"]]
    user = str(f["instruction"]) + (f"\n\n{f['input']}" if str(f.get("input") or "").strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(f["output"])}]


def _chat(f: Fields, tokenizer: Any) -> list[Segment]:
    """The tokenizer's own chat template; each assistant turn is trained (found by rendering prefixes)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise KdpipeError("template 'chat' needs a tokenizer with a chat template; this tokenizer has none")
    messages, segments, done = _messages(f), [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not before.startswith(done) or not through.startswith(before):
            raise KdpipeError("this tokenizer's chat template does not render conversations as growing "
                              "prefixes")
        segments += [Segment(before[len(done):], False), Segment(through[len(before):], True)]
        done = through
    if not segments:
        raise KdpipeError("template 'chat': the conversation has no assistant message")
    return segments


SENTIMENT_USE: dict[str, Any] = {"lists_labels": True, "default_tasks": ("classify",)}

# name -> (required fields, renderer, how the template is used: Template's keyword arguments)
BUILTIN: dict[str, tuple[tuple[str, ...], Callable[[Fields, Any], list[Segment]], dict[str, Any]]] = {
    "alpaca": (("instruction", "output"), _alpaca, {"completion_field": "output"}),
    "sentiment": (("text", "label"), _sentiment, SENTIMENT_USE),
    "sentiment-think": (("text", "label", "rationale"), _sentiment_think,
                        {**SENTIMENT_USE, "generates_label": True, "answer_tokens": 256}),
    "guanaco": (("text",), _guanaco, {}),
    "chat": ((), _chat, {"add_eos": False, "special_prefix": False, "renders_with_tokenizer": True,
                         "completion_field": "output"}),
    "text": (("text",), _text, {}),
    "arithmetic": (("instruction", "output"), _arithmetic,
                   {"default_tasks": ("exact-match", "perplexity"), "checker": "arithmetic",
                    "completion_field": "output"}),
}


def get_template(name: str, label_names: tuple[str, ...] | list[str] = ("negative", "positive")) -> Template:
    """A built-in template by name, or a user template from a .yaml/.yml/.json file."""
    if name in BUILTIN:
        required, fn, use = BUILTIN[name]
        return Template(name, required, fn, label_names=tuple(label_names), **use)
    if Path(name).suffix in (".yaml", ".yml", ".json"):
        return _user_template(Path(name), tuple(label_names))
    raise KdpipeError(f"unknown template '{name}'; use one of {', '.join(BUILTIN)} or a template .yaml file")


def _user_template(path: Path, label_names: tuple[str, ...]) -> Template:
    spec = read_yaml(path)
    unknown = set(spec) - {"prompt", "completion", "add_eos", "description"}
    if unknown or "prompt" not in spec or "completion" not in spec:
        raise KdpipeError(
            f"template file {path} must have 'prompt' and 'completion' (optional: add_eos, description); "
            f"unknown keys: {', '.join(sorted(unknown)) or 'none'}"
        )
    prompt, completion = str(spec["prompt"]), str(spec["completion"])
    required, fields = [], set()
    for text in (prompt, completion):
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as e:
            raise KdpipeError(f"template file {path}: bad format string ({e}); write literal braces as "
                              "{{ }}") from None
        if any(not n.isidentifier() for n in names):
            raise KdpipeError(f"template file {path}: fields must be plain names like {{instruction}}, "
                              f"got {names}")
        required += [n for n in names if n not in required]
        fields = set(names)  # the completion's, after the last pass

    def render(f: Fields, _tok: Any) -> list[Segment]:
        values = {k: label_text(v, label_names) if k == "label" else v for k, v in f.items()}
        return [Segment(prompt.format(**values), False), Segment(completion.format(**values), True)]

    return Template(str(path), tuple(required), render, bool(spec.get("add_eos", True)), label_names,
                    completion_field=fields.pop() if len(fields) == 1 else None)
