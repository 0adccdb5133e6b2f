"""Evaluation tasks on a dataset, in a registry: classify (label scoring or a generated answer),
exact-match (greedy answers judged by a checker) and perplexity (the template's trained tokens).

Each task is a function (model, tokenizer, examples, template, cfg, spec) -> (metrics, per-example
predictions). What a template needs of them (its default tasks, classifying by generation, its
checker, its special prefix) is an attribute of the `Template`. The model mechanics
(`kdpipe.evaluation.scoring`) and the metrics are imported where a task runs: EvaluateConfig checks task
names against this registry, and the CLI imports it for `--help` without loading torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.config import to_dict
from kdpipe.data.sources import Example
from kdpipe.data.templates import Segment, Template, label_text
from kdpipe.data.tokenize import prompt_ids, tokenize_examples
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.checkers import make_checker

Outcome = tuple[dict[str, float], list[dict[str, Any]]]


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[..., Outcome]  # (model, tokenizer, examples, template, cfg, spec)
    compares_completion: bool  # each example needs a completion (a reference or its label) to compare with


def split_prompt(segments: list[Segment]) -> tuple[list[str], str]:
    """(untrained segment texts before the first trained one, the first trained segment's text)."""
    prompt: list[str] = []
    for s in segments:
        if s.trained:
            return prompt, s.text
        prompt.append(s.text)
    return prompt, ""


def classify(
    model: Any, tokenizer: Any, examples: list[Example], template: Template, cfg: Any, spec: Any
) -> Outcome:
    """Accuracy and macro-F1: each label's continuation scored after the prompt (or generated and parsed)."""
    from kdpipe.evaluation import scoring

    names = list(cfg.label_names)
    gold = [label_text(e.fields["label"], tuple(names)) for e in examples]
    if cfg.generate or template.generates_label:
        return _classify_by_generation(model, tokenizer, examples, template, cfg, spec, gold)
    sequences, positions = [], []
    for e in examples:
        for name in names:
            prompt, completion = split_prompt(template.render({**e.fields, "label": name}, e.id, tokenizer))
            p_ids = prompt_ids(tokenizer, prompt, template)
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if not p_ids or not c_ids:
                raise KdpipeError(f"example '{e.id}': the prompt or the label '{name}' tokenizes to nothing")
            sequences.append(np.asarray(p_ids + c_ids, np.int64))
            positions.append(np.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1))
    lp = scoring.target_logprobs(
        model,
        sequences,
        positions,
        tokenizer.pad_token_id,
        batch_size=cfg.batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        desc=f"{spec.name}: classify",
    )
    bounds = np.cumsum([0] + [len(p) for p in positions])
    sums = [lp[bounds[i] : bounds[i + 1]].sum() for i in range(len(positions))]
    scores = np.array(sums).reshape(len(examples), len(names))
    predicted = [names[int(np.argmax(row))] for row in scores]
    preds = [
        {
            "id": e.id,
            "gold": g,
            "predicted": p,
            "scores": dict(zip(names, map(float, row))),
            "correct": g == p,
        }
        for e, g, p, row in zip(examples, gold, predicted, scores)
    ]
    return _label_metrics(gold, predicted, names), preds


def _label_metrics(gold: list[str], predicted: list[str | None], names: list[str]) -> dict[str, float]:
    from kdpipe.evaluation import metrics

    return {
        "accuracy": metrics.accuracy(gold, predicted),
        "macro_f1": metrics.macro_f1(gold, predicted, names),
    }


def _classify_by_generation(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    template: Template,
    cfg: Any,
    spec: Any,
    gold: list[str],
) -> Outcome:
    from kdpipe.evaluation import scoring

    names = list(cfg.label_names)
    prompts = [
        prompt_ids(tokenizer, split_prompt(template.render(e.fields, e.id, tokenizer))[0], template)
        for e in examples
    ]
    new = scoring.greedy_generate(
        model,
        prompts,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        cfg.max_new_tokens or template.answer_tokens,
        cfg.batch_size,
        desc=f"{spec.name}: classify",
    )
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    predicted = [parse_label(t, names) for t in texts]
    preds = [
        {"id": e.id, "gold": g, "predicted": p, "output": t, "correct": g == p}
        for e, g, p, t in zip(examples, gold, predicted, texts)
    ]
    unparsed = sum(p is None for p in predicted) / len(predicted)
    return {**_label_metrics(gold, predicted, names), "unparsed": unparsed}, preds


def parse_label(text: str, names: list[str]) -> str | None:
    """The label named right after the last 'Sentiment:' (or at the start of `text`), case-insensitive."""
    tail = text.rsplit("Sentiment:", 1)[-1] if "Sentiment:" in text else text
    words = re.findall(r"[A-Za-z0-9_-]+", tail)
    if not words:
        return None
    lower = {n.lower(): n for n in names}
    return lower.get(words[0].lower())


def exact_match(
    model: Any, tokenizer: Any, examples: list[Example], template: Template, cfg: Any, spec: Any
) -> Outcome:
    """Greedy answers after each prompt, judged by the checker."""
    from kdpipe.evaluation import metrics, scoring

    check = make_checker(cfg.checker, template)
    prompts, references = [], []
    for e in examples:
        prompt, completion = split_prompt(template.render(e.fields, e.id, tokenizer))
        prompts.append(prompt_ids(tokenizer, prompt, template))
        references.append(completion)
    longest = max(len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"])
    new = scoring.greedy_generate(
        model,
        prompts,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        cfg.max_new_tokens or longest + 16,
        cfg.batch_size,
        desc=f"{spec.name}: exact-match",
    )
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    correct = [bool(check(e.fields, a, r)) for e, a, r in zip(examples, answers, references)]
    preds = [
        {"id": e.id, "answer": a, "reference": r, "correct": c}
        for e, a, r, c in zip(examples, answers, references, correct)
    ]
    return {"exact_match": metrics.exact_match(correct)}, preds


def perplexity(
    model: Any, tokenizer: Any, examples: list[Example], template: Template, cfg: Any, spec: Any
) -> Outcome:
    """exp(mean NLL) of the template's trained tokens (as training sees them: EOS included, prompt not)."""
    from kdpipe.evaluation import metrics, scoring

    tokenized, _report = tokenize_examples(examples, template, tokenizer, cfg)
    lp = scoring.target_logprobs(
        model,
        [t.input_ids for t in tokenized],
        [t.positions for t in tokenized],
        tokenizer.pad_token_id,
        batch_size=cfg.batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        desc=f"{spec.name}: perplexity",
    )
    return {"perplexity": metrics.perplexity(float(-lp.sum()), int(lp.size)), "tokens": int(lp.size)}, []


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("classify", classify, compares_completion=True),
        Task("exact-match", exact_match, compares_completion=True),
        Task("perplexity", perplexity, compares_completion=False),
    )
}
TASK_NAMES = ("auto", *TASKS)  # what --task accepts


def resolve_tasks(cfg: Any, template: Template | None) -> list[str]:
    """--task with `auto` replaced by the template's default tasks; none without data."""
    if not cfg.dataset:
        explicit = [t for t in cfg.task if t != "auto"]
        if explicit:
            raise KdpipeError(
                f"--task {','.join(explicit)} needs data: pass --dataset (and --split, --template ...)"
            )
        return []
    tasks: list[str] = []
    for task in cfg.task:
        names = list(template.default_tasks) if task == "auto" else [task]
        tasks += [t for t in names if t not in tasks]
    return tasks


def check_examples(examples: list[Example], template: Template, tasks: list[str], cfg: Any) -> None:
    """Render every example once (no tokenizer): missing fields, labels outside --label-names, no
    completion."""
    if template.renders_with_tokenizer:  # nothing to render before a model's tokenizer is loaded
        return
    names = list(cfg.label_names)
    compared = [t for t in tasks if TASKS[t].compares_completion]
    for e in examples:
        segments = template.render(e.fields, e.id)
        if not any(s.trained for s in segments) and compared:
            raise KdpipeError(
                f"example '{e.id}': template {template.name} gives it no completion to compare with"
            )
    if "classify" in tasks:
        if "label" not in template.required and "label" not in (examples[0].fields if examples else {}):
            raise KdpipeError(
                f"task classify needs a 'label' field; template {template.name} has none "
                "(map a column with --columns label=COLUMN and use a sentiment or your own "
                "template)"
            )
        for e in examples:
            gold = label_text(e.fields.get("label"), tuple(names))
            if gold not in names:
                raise KdpipeError(
                    f"example '{e.id}' has the label '{gold}', which is not among the label "
                    f"names {names}; pass --label-names covering every label of the data"
                )
        if len(names) < 2:
            raise KdpipeError(f"task classify needs at least two label names, got {names}")


def data_info(
    cfg: Any, examples: list[Example], template: Template | None, tasks: list[str]
) -> dict[str, Any]:
    """What results.json says of the data: the dataset, its selection, the template, the tasks, the config."""
    if not tasks:
        return {}
    labels = {"label_names": list(cfg.label_names)} if "classify" in tasks else {}  # only classify has labels
    config = {k: v for k, v in to_dict(cfg).items() if k != "label_names" or labels}
    return {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "part": cfg.part,
        "heldout_fraction": cfg.heldout_fraction,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "examples": len(examples),
        "template": template.name,
        **labels,
        "tasks": tasks,
        "config": config,
    }
