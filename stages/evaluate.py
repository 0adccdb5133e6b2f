"""Evaluate: task metrics, fidelity to the teacher, lm-evaluation-harness tasks; several models side by side.

Recipe: resolve the models (hub ids, folders, LoRA adapters, run folders; by default the latest
finished run's student, its base and its teacher), load and check the data once, then one model at a
time (never two in memory): load, run each task, the cache fidelity pass and lm-eval, free. Write
one table as JSON and CSV (+ per-example predictions and plots) and return it.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import kdpipe
from kdpipe import arithmetic, metrics, scoring
from kdpipe.cache.storage import write_atomic
from kdpipe.config import option, to_dict
from kdpipe.data import DataConfig, Example, load_examples
from kdpipe.errors import KdpipeError
from kdpipe.models import load_model, load_tokenizer, pick_device, resolve_model_name, vocab_hash
from kdpipe.templates import Segment, Template, get_template, label_text
from kdpipe.tokenize import special_prefix, tokenize_examples

TASKS = ("auto", "classify", "exact-match", "perplexity")
RUN_FILE = "kdpipe_run.json"
EXPERIMENT_FILE = "kdpipe_experiment.json"  # written by `kdpipe run` above its step folders
FINISHED = ("complete", "done")

DEFINITIONS = {
    "classify/accuracy": "fraction of examples whose predicted label is the gold label; the prediction is the label "
                         "whose continuation has the highest summed log-prob after the prompt (or, with --generate, "
                         "the label parsed after 'Sentiment:' in the greedy output)",
    "classify/macro_f1": "unweighted mean over labels (present in gold or predictions) of 2TP/(2TP+FP+FN)",
    "classify/unparsed": "fraction of generated answers in which no label could be found (--generate)",
    "exact-match/exact_match": "fraction of greedy answers accepted by the checker",
    "perplexity/perplexity": "exp(mean negative log-likelihood of the template's trained tokens, EOS included); "
                             "padding never scored",
    "fidelity/kl": "mean over cached positions of KL(teacher||student) in nats over k+1 atoms (teacher top-k ids + "
                   "one tail atom: the teacher's cached tail mass vs the student's exact mass outside those ids); "
                   "a lower bound of the full-vocabulary KL, exact when the tail is empty",
    "fidelity/top1_agreement": "fraction of positions where the student's argmax is the teacher's top-1 id",
    "fidelity/topk_recall": "mean |student top-k ∩ teacher top-k| / k, k = the cache's k",
    "fidelity/ece": "ECE (15 equal-width bins) of the student's max probability vs its argmax being the actual next token",
    "fidelity/ece_teacher": "ECE (15 bins) of the student's max probability vs its argmax being the teacher's top-1 id",
    "fidelity/cache_ppl": "the student's perplexity of the cached examples' actual target tokens",
}


@dataclass
class EvaluateConfig(DataConfig):
    """Options of `kdpipe evaluate` (YAML keys; CLI options with dashes)."""

    model: list[str] = option([], "Model to evaluate (repeat for several): hub id, folder, LoRA adapter folder or run "
                                  "folder. Default: the latest finished run's student, its base and its teacher.")
    task: list[str] = option(["auto"], "classify, exact-match, perplexity (comma-separated), or auto (by template: "
                                       "sentiment -> classify, arithmetic -> exact-match,perplexity, else perplexity).")
    cache: str | None = option(None, "Held-out teacher cache: fidelity to the teacher (KL, top-1 agreement, top-k recall, ECE).")
    cache_limit: int | None = option(None, "Use at most this many cached examples.")
    checker: str | None = option(None, "Exact-match checker: arithmetic, exact, regex:PATTERN ({field} inserts a field, "
                                       "escaped) or path/to/file.py:function (fields, answer) -> bool. Default: arithmetic "
                                       "for the arithmetic template, else exact (equal to the reference, stripped).")
    generate: bool = option(False, "classify by greedy generation and parsing the label after 'Sentiment:' (the default "
                                   "for sentiment-think) instead of scoring each label.")
    max_new_tokens: int | None = option(None, "Generation length (default: longest reference + 16; 256 for sentiment-think).")
    lm_eval: list[str] = option([], "lm-evaluation-harness tasks, e.g. ifeval,hellaswag (needs kdpipe[lm-eval]; --limit applies).")
    output: str | None = option(None, "Folder for results.json/.csv, predictions and plots (default: RUN/eval for a run, else eval).")
    batch_size: int = option(64, "Most sequences in one forward pass (or one generation batch).")
    max_batch_tokens: int = option(16384, "Most tokens (rows × longest row) in one forward pass.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Weights dtype (auto keeps the checkpoint's).")
    device: str = option("auto", "Device: auto (CUDA if present), cpu, cuda, cuda:1 ...")
    plot: bool = option(True, "Write metrics.png (and training curves of runs); needs matplotlib.")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.task if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {', '.join(map(repr, unknown))}; use one of {', '.join(TASKS)}")
        for name in ("batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_new_tokens", "cache_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass
class ModelSpec:
    """One model of the table: what the user named and how to load it."""

    name: str
    source: str
    kind: str  # "model" or "adapter"
    path: str
    base: str | None = None
    run: Path | None = None
    role: str | None = None
    optional: bool = False  # skipped with a note (not an error) when it cannot be loaded
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- entry point


def run(cfg: EvaluateConfig, command: str = "", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every model of `cfg`; write results.json/.csv (+ predictions, plots); return the results."""
    torch.manual_seed(cfg.seed)
    pick_device(cfg.device)  # a device this machine lacks: said before anything loads
    specs, run_record = _models(cfg, echo)
    tasks = _tasks(cfg)
    if not tasks and not cfg.cache and not cfg.lm_eval:
        raise KdpipeError("nothing to evaluate: pass --dataset (with --task), --cache and/or --lm-eval")
    manager = _check_lm_eval(cfg.lm_eval) if cfg.lm_eval else None
    template = get_template(cfg.resolved_template(), cfg.label_names) if tasks else None
    examples = load_examples(cfg).examples if tasks else []
    if tasks and template.name != "chat":
        _check_examples(examples, template, tasks, cfg)
    cache = _open_cache(cfg.cache, echo, specs) if cfg.cache else None

    tokenizers = {}
    for spec in list(specs):
        try:
            tokenizers[spec.name] = _load_tokenizer(spec)
        except KdpipeError as e:
            if not spec.optional:
                raise
            echo(f"skipping the {spec.role or 'model'} {spec.source}: {e.message}")
            specs.remove(spec)

    results: dict[str, Any] = {
        "kdpipe_version": kdpipe.__version__, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": _data_info(cfg, examples, template, tasks), "cache": cfg.cache, "lm_eval": cfg.lm_eval,
        "definitions": {}, "models": [],
    }
    predictions: list[dict[str, Any]] = []
    for spec in specs:
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        try:
            model, tokenizer = _load(spec, cfg), tokenizers[spec.name]
        except KdpipeError as e:
            if not spec.optional:
                raise
            echo(f"skipping the {spec.role or 'model'} {spec.source}: {e.message}")
            continue
        threads = torch.get_num_threads()
        if _small_on_cpu(model):
            torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than they save (10x on a busy CPU)
        values: dict[str, float] = {}
        for task in tasks:
            out, preds = TASK_FUNCTIONS[task](model, tokenizer, examples, template, cfg, spec)
            values.update({f"{task}/{k}": v for k, v in out.items()})
            predictions += [{"model": spec.name, "task": task, **p} for p in preds]
        if cache is not None:
            values.update({f"fidelity/{k}": v for k, v in fidelity(model, tokenizer, cache, cfg, spec).items()})
        if cfg.lm_eval:
            values.update(run_lm_eval(model, tokenizer, cfg, manager))
        torch.set_num_threads(threads)
        del model
        gc.collect()
        results["models"].append({
            "name": spec.name, "source": spec.source, "kind": spec.kind, "role": spec.role, "path": spec.path,
            "base": spec.base, "run": str(spec.run) if spec.run else None, "notes": spec.notes, "metrics": values,
            "seconds": round(time.perf_counter() - start, 2),
        })
        for note in spec.notes:
            echo(f"note ({spec.name}): {note}")
    keys = metric_keys(results)
    results["definitions"] = {k: DEFINITIONS[k] for k in keys if k in DEFINITIONS}
    out = _output_folder(cfg, specs, run_record)
    plotted: list[str] = []
    if cfg.plot:
        from kdpipe import plots

        plotted, message = plots.write_plots(results, {s.name: s.run for s in specs if s.run}, out)
        if message:
            echo(message)
    write_results(results, predictions, out, plotted)
    return results


# ---------------------------------------------------------------- models


def _models(cfg: EvaluateConfig, echo: Callable[[str], None]) -> tuple[list[ModelSpec], dict[str, Any] | None]:
    if cfg.model:
        specs = [resolve_spec(m) for m in cfg.model]
        record = None
        for spec in specs:
            if spec.run is not None and not cfg.dataset:
                record = _read_json(spec.run / RUN_FILE)
                _data_from_run(cfg, record, echo)
                break
    else:
        folder, record = latest_run()
        experiment = experiment_of(folder)
        echo(f"evaluating the latest finished run {folder}"
             + (f" (of the experiment {experiment['config']})" if experiment else ""))
        specs = [resolve_spec(str(folder))]
        specs[0].role = "student"
        base = (record.get("config") or {}).get("model") or (record.get("identity") or {}).get("model")
        if base:
            specs.append(ModelSpec(_short(base), base, "model", base, role="base"))
        teacher = _run_teacher(record) or (experiment or {}).get("teacher")
        if teacher:
            specs.append(ModelSpec(_short(teacher), teacher, "model", teacher, role="teacher", optional=True))
        if experiment and experiment.get("evaluate") and not cfg.dataset and not cfg.cache:
            _settings_from_experiment(cfg, experiment["evaluate"])
            echo(f"settings: the evaluate section of {experiment['config']} (data, tasks, cache)")
        if not cfg.dataset:
            _data_from_run(cfg, record, echo)
    _unique_names(specs)
    return specs, record


def resolve_spec(source: str) -> ModelSpec:
    """A hub id, a model folder, a LoRA adapter folder or a run folder (model or adapter at its top)."""
    path = Path(source).expanduser()
    if not path.exists():
        resolved = resolve_model_name(source)  # a clear error for a missing local path
        return ModelSpec(_short(source), source, "model", resolved)
    if not path.is_dir():
        raise KdpipeError(f"model {source} is a file; pass a model folder, a LoRA adapter folder, a run folder or a hub id")
    run = path if (path / RUN_FILE).is_file() else None
    if run is not None:
        record = _read_json(path / RUN_FILE)
        if record.get("status") not in FINISHED:
            raise KdpipeError(f"run {path} has status '{record.get('status')}', not finished; evaluate it when it is complete")
    if (path / "adapter_config.json").is_file():
        base = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise KdpipeError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
        if base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
            raise KdpipeError(
                f"the LoRA adapter {source} is on the base model {base}, which does not exist (any more): "
                f"that path comes from {path / 'adapter_config.json'} (base_model_name_or_path). Point it at "
                "where the base model is now (a folder or hub id) by editing that key, or evaluate a merged "
                "model (kdpipe merge-lora)")
        return ModelSpec(path.resolve().name, source, "adapter", str(path), base=base, run=run)
    if (path / "config.json").is_file():
        return ModelSpec(path.resolve().name, source, "model", str(path), run=run)
    raise KdpipeError(f"{source} holds no model (no config.json) and no LoRA adapter (no adapter_config.json)")


def latest_run(root: str | Path = "runs") -> tuple[Path, dict[str, Any]]:
    """The newest run folder under `root` whose kdpipe_run.json says it finished."""
    found = []
    for file in Path(root).rglob(RUN_FILE):  # runs/NAME and `kdpipe run`'s runs/NAME/STEP
        record = _read_json(file, quiet=True)
        if record and record.get("status") in FINISHED:
            found.append((str(record.get("updated", "")), file.stat().st_mtime, file.parent, record))
    if not found:
        raise KdpipeError(f"no --model given and no finished run under {root}/ (a folder with {RUN_FILE}, "
                          "at any depth); "
                          "pass --model, or run `kdpipe train-student` first")
    _, _, folder, record = max(found, key=lambda f: (f[0], f[1]))
    return folder, record


def experiment_of(folder: Path) -> dict[str, Any] | None:
    """The `kdpipe run` experiment that `folder` is a run of (its kdpipe_experiment.json above), or None."""
    run = str(folder.resolve())
    for parent in folder.resolve().parents:
        record = _read_json(parent / EXPERIMENT_FILE, quiet=True)
        if run in record.get("runs", []):
            return record
        if parent == Path.cwd():
            return None
    return None


def _settings_from_experiment(cfg: EvaluateConfig, settings: dict[str, Any]) -> None:
    """The experiment's own `evaluate:` options, but for models and output folder (the latest run's)."""
    defaults = EvaluateConfig()
    for name, value in settings.items():
        unset = hasattr(cfg, name) and getattr(cfg, name) == getattr(defaults, name)
        if unset and name not in ("model", "output"):
            setattr(cfg, name, value)


def run_caches(record: dict[str, Any]) -> list[str]:
    """The caches a run trained on: one, or several mixed (train-student --cache A --cache B)."""
    cache = (record.get("config") or {}).get("cache")
    return [] if not cache else [cache] if isinstance(cache, str) else list(cache)


def _run_teacher(record: dict[str, Any]) -> str | None:
    cache = (run_caches(record) or [None])[0]
    if not cache:
        return None
    manifest = _read_json(Path(cache) / "manifest.json", quiet=True)
    return ((manifest or {}).get("teacher") or {}).get("model")


def _data_from_run(cfg: EvaluateConfig, record: dict[str, Any], echo: Callable[[str], None]) -> None:
    """No --dataset: evaluate on the run's data, its held-out part (or the test split of kdpipe:arithmetic)."""
    run_cfg = record.get("config") or {}
    data = dict(run_cfg)
    if record.get("kind") == "train-student" and run_cfg.get("cache"):
        manifest = _read_json(Path(run_caches(record)[0]) / "manifest.json", quiet=True) or {}
        data = {**(manifest.get("dataset") or {}), "template": (manifest.get("template") or {}).get("name"),
                "label_names": (manifest.get("template") or {}).get("label_names")}
        data["dataset"] = data.get("source")
    if not data.get("dataset"):
        return
    cfg.dataset = data["dataset"]
    if cfg.template == "auto" and data.get("template"):
        cfg.template = data["template"]
    if data.get("label_names"):
        cfg.label_names = list(data["label_names"])
    if not cfg.columns and data.get("columns"):
        cfg.columns = dict(data["columns"])
    if data.get("part") == "train" and data.get("heldout_fraction"):
        cfg.split, cfg.part = data.get("split", cfg.split), "heldout"
        cfg.heldout_fraction, cfg.seed = float(data["heldout_fraction"]), int(data.get("seed", cfg.seed))
    elif cfg.dataset == "kdpipe:arithmetic":
        cfg.split, cfg.part = "test", "all"
    else:
        cfg.split = data.get("split", cfg.split)
        echo(f"note: the run trained on all of {cfg.dataset} ({cfg.split}); evaluating on that same data")
    echo(f"data: {cfg.dataset} split={cfg.split} part={cfg.part} template={cfg.resolved_template()}")


def _load_tokenizer(spec: ModelSpec) -> Any:
    if spec.kind == "adapter":
        has = any((Path(spec.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return load_tokenizer(spec.path if has else spec.base)
    return load_tokenizer(spec.path)


def _load(spec: ModelSpec, cfg: EvaluateConfig) -> Any:
    """The model in eval mode; an adapter as a peft `PeftModel` on its base (named in adapter_config.json)."""
    if spec.kind != "adapter":
        return load_model(spec.path, cfg.dtype, cfg.device)
    from peft import PeftModel

    base = load_model(spec.base, cfg.dtype, cfg.device)
    try:
        return PeftModel.from_pretrained(base, spec.path).eval()
    except Exception as e:
        raise KdpipeError(f"could not load the LoRA adapter {spec.source} on its base {spec.base}: {_first_line(e)}") from None


def _small_on_cpu(model: Any, limit: int = 20_000_000) -> bool:
    """A model under `limit` parameters on the CPU (evaluated single-threaded)."""
    first = next(model.parameters())
    return first.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < limit


def _unique_names(specs: list[ModelSpec]) -> None:
    seen: dict[str, int] = {}
    for spec in specs:
        n = seen.get(spec.name, 0)
        seen[spec.name] = n + 1
        if n:
            spec.name = f"{spec.name}#{n + 1}"


# ---------------------------------------------------------------- data and tasks


def _tasks(cfg: EvaluateConfig) -> list[str]:
    if not cfg.dataset:
        explicit = [t for t in cfg.task if t != "auto"]
        if explicit:
            raise KdpipeError(f"--task {','.join(explicit)} needs data: pass --dataset (and --split, --template ...)")
        return []
    tasks: list[str] = []
    for task in cfg.task:
        if task == "auto":
            name = cfg.resolved_template()
            task_list = (["classify"] if name.startswith("sentiment") else
                         ["exact-match", "perplexity"] if name == "arithmetic" else ["perplexity"])
        else:
            task_list = [task]
        tasks += [t for t in task_list if t not in tasks]
    return tasks


def _check_examples(examples: list[Example], template: Template, tasks: list[str], cfg: EvaluateConfig) -> None:
    """Render every example once (no tokenizer): missing fields, labels outside --label-names, no completion."""
    names = list(cfg.label_names)
    for e in examples:
        segments = template.render(e.fields, e.id)
        if not any(s.trained for s in segments) and set(tasks) & {"classify", "exact-match"}:
            raise KdpipeError(f"example '{e.id}': template {template.name} gives it no completion to compare with")
    if "classify" in tasks:
        if "label" not in template.required and "label" not in (examples[0].fields if examples else {}):
            raise KdpipeError(f"task classify needs a 'label' field; template {template.name} has none "
                              "(map a column with --columns label=COLUMN and use a sentiment or your own template)")
        for e in examples:
            gold = label_text(e.fields.get("label"), tuple(names))
            if gold not in names:
                raise KdpipeError(f"example '{e.id}' has the label '{gold}', which is not among the label names "
                                  f"{names}; pass --label-names covering every label of the data")
        if len(names) < 2:
            raise KdpipeError(f"task classify needs at least two label names, got {names}")


def _data_info(cfg: EvaluateConfig, examples: list[Example], template: Template | None, tasks: list[str]) -> dict[str, Any]:
    if not tasks:
        return {}
    labels = {"label_names": list(cfg.label_names)} if "classify" in tasks else {}  # only classify has labels
    config = {k: v for k, v in to_dict(cfg).items() if k != "label_names" or labels}
    return {"dataset": cfg.dataset, "split": cfg.split, "part": cfg.part, "heldout_fraction": cfg.heldout_fraction,
            "seed": cfg.seed, "limit": cfg.limit, "examples": len(examples), "template": template.name,
            **labels, "tasks": tasks, "config": config}


def split_prompt(segments: list[Segment]) -> tuple[list[str], str]:
    """(untrained segment texts before the first trained one, the first trained segment's text)."""
    prompt: list[str] = []
    for s in segments:
        if s.trained:
            return prompt, s.text
        prompt.append(s.text)
    return prompt, ""


def _prompt_ids(tokenizer: Any, texts: list[str], template: Template) -> list[int]:
    """Segments tokenized one by one and joined, after the special prefix: exactly as in training."""
    ids = list(special_prefix(tokenizer)) if template.name != "chat" else []
    for piece in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids += piece
    return ids


def classify(model: Any, tokenizer: Any, examples: list[Example], template: Template, cfg: EvaluateConfig,
             spec: ModelSpec) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Accuracy and macro-F1: each label's continuation scored after the prompt (or generated and parsed)."""
    names = list(cfg.label_names)
    gold = [label_text(e.fields["label"], tuple(names)) for e in examples]
    if cfg.generate or template.name == "sentiment-think":
        prompts = [_prompt_ids(tokenizer, split_prompt(template.render(e.fields, e.id, tokenizer))[0], template)
                   for e in examples]
        new = scoring.greedy_generate(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                      cfg.max_new_tokens or (256 if template.name == "sentiment-think" else 8),
                                      cfg.batch_size, desc=f"{spec.name}: classify")
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        predicted = [parse_label(t, names) for t in texts]
        preds = [{"id": e.id, "gold": g, "predicted": p, "output": t, "correct": g == p}
                 for e, g, p, t in zip(examples, gold, predicted, texts)]
        out = {"accuracy": metrics.accuracy(gold, predicted), "macro_f1": metrics.macro_f1(gold, predicted, names),
               "unparsed": sum(p is None for p in predicted) / len(predicted)}
        return out, preds
    sequences, positions = [], []
    for e in examples:
        for name in names:
            prompt, completion = split_prompt(template.render({**e.fields, "label": name}, e.id, tokenizer))
            p_ids = _prompt_ids(tokenizer, prompt, template)
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if not p_ids or not c_ids:
                raise KdpipeError(f"example '{e.id}': the prompt or the label '{name}' tokenizes to nothing")
            sequences.append(np.asarray(p_ids + c_ids, np.int64))
            positions.append(np.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1))
    lp = scoring.target_logprobs(model, sequences, positions, tokenizer.pad_token_id, batch_size=cfg.batch_size,
                                 max_batch_tokens=cfg.max_batch_tokens, desc=f"{spec.name}: classify")
    bounds = np.cumsum([0] + [len(p) for p in positions])
    scores = np.array([lp[bounds[i]:bounds[i + 1]].sum() for i in range(len(positions))]).reshape(len(examples), len(names))
    predicted = [names[int(np.argmax(row))] for row in scores]
    preds = [{"id": e.id, "gold": g, "predicted": p, "scores": dict(zip(names, map(float, row))), "correct": g == p}
             for e, g, p, row in zip(examples, gold, predicted, scores)]
    return {"accuracy": metrics.accuracy(gold, predicted), "macro_f1": metrics.macro_f1(gold, predicted, names)}, preds


def parse_label(text: str, names: list[str]) -> str | None:
    """The label named right after the last 'Sentiment:' (or at the start of `text`), case-insensitive."""
    tail = text.rsplit("Sentiment:", 1)[-1] if "Sentiment:" in text else text
    words = re.findall(r"[A-Za-z0-9_-]+", tail)
    if not words:
        return None
    lower = {n.lower(): n for n in names}
    return lower.get(words[0].lower())


def exact_match(model: Any, tokenizer: Any, examples: list[Example], template: Template, cfg: EvaluateConfig,
                spec: ModelSpec) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers after each prompt, judged by the checker."""
    check = make_checker(cfg.checker, template)
    prompts, references = [], []
    for e in examples:
        prompt, completion = split_prompt(template.render(e.fields, e.id, tokenizer))
        prompts.append(_prompt_ids(tokenizer, prompt, template))
        references.append(completion)
    longest = max(len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"])
    new = scoring.greedy_generate(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                  cfg.max_new_tokens or longest + 16, cfg.batch_size, desc=f"{spec.name}: exact-match")
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    correct = [bool(check(e.fields, a, r)) for e, a, r in zip(examples, answers, references)]
    preds = [{"id": e.id, "answer": a, "reference": r, "correct": c} for e, a, r, c in zip(examples, answers, references, correct)]
    return {"exact_match": metrics.exact_match(correct)}, preds


def make_checker(spec: str | None, template: Template) -> Callable[[dict[str, Any], str, str], bool]:
    """checker(fields, answer, reference) -> bool from a --checker value (see EvaluateConfig.checker)."""
    spec = spec or ("arithmetic" if template.name == "arithmetic" else "exact")
    if spec in ("arithmetic", "builtin:arithmetic", "kdpipe.arithmetic.check"):
        def arith(fields: dict[str, Any], answer: str, _ref: str) -> bool:
            if "instruction" not in fields:
                raise KdpipeError("the arithmetic checker needs an 'instruction' field (the number)")
            return arithmetic.check(str(fields["instruction"]), answer)
        return arith
    if spec == "exact":
        return lambda _f, answer, ref: answer.strip() == ref.strip()
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]

        def regex(fields: dict[str, Any], answer: str, _ref: str) -> bool:
            def field_value(m: re.Match[str]) -> str:
                return re.escape(str(fields[m.group(1)])) if m.group(1) in fields else m.group(0)
            filled = re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", field_value, pattern)
            try:
                return re.fullmatch(filled, answer.strip()) is not None
            except re.error as e:
                raise KdpipeError(f"--checker regex:{pattern} is not a valid regular expression: {e}") from None
        try:
            re.compile(re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", "x", pattern))
        except re.error as e:
            raise KdpipeError(f"--checker regex:{pattern} is not a valid regular expression: {e}") from None
        return regex
    file, sep, name = spec.rpartition(":")
    if sep and file.endswith(".py"):
        fn = _load_function(Path(file), name)
        return lambda fields, answer, _ref: bool(fn(fields, answer))
    raise KdpipeError(f"unknown --checker {spec!r}; use arithmetic, exact, regex:PATTERN or path/to/file.py:function")


def _load_function(path: Path, name: str) -> Callable[..., Any]:
    if not path.is_file():
        raise KdpipeError(f"checker file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"kdpipe_checker_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise KdpipeError(f"checker file {path} failed to import: {_first_line(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise KdpipeError(f"checker file {path} has no function {name!r}")
    return fn


def perplexity(model: Any, tokenizer: Any, examples: list[Example], template: Template, cfg: EvaluateConfig,
               spec: ModelSpec) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """exp(mean NLL) of the template's trained tokens (as training sees them: EOS included, prompt not)."""
    tokenized, _report = tokenize_examples(examples, template, tokenizer, cfg)
    lp = scoring.target_logprobs(model, [t.input_ids for t in tokenized], [t.positions for t in tokenized],
                                 tokenizer.pad_token_id, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                                 desc=f"{spec.name}: perplexity")
    return {"perplexity": metrics.perplexity(float(-lp.sum()), int(lp.size)), "tokens": int(lp.size)}, []


TASK_FUNCTIONS = {"classify": classify, "exact-match": exact_match, "perplexity": perplexity}


# ---------------------------------------------------------------- fidelity to the teacher


def _open_cache(path: str, echo: Callable[[str], None] = print, specs: list[ModelSpec] = ()) -> Any:
    """The held-out cache; a note when its examples are in a run's training cache (or, with no run to compare
    with, when nothing says it is held out)."""
    from kdpipe.cache.tools import open_checked

    cache = open_checked(path)
    data = cache.manifest.get("dataset") or {}
    records = [_read_json(s.run / RUN_FILE, quiet=True) for s in specs if s.run]
    trained = [t for t in {c for r in records for c in run_caches(r)} if t and _exists(t)]
    if trained:
        mine = example_hashes(cache)
        for other in sorted(trained):
            shared = len(mine & example_hashes(open_checked(other)))
            if shared:
                echo(f"note: {shared} of the {len(mine)} examples of cache {path} are also in {other}, the "
                     "training cache of a run evaluated here; fidelity on training data flatters a student")
    elif not (data.get("heldout") or data.get("part") == "heldout" or data.get("split") != "train"):
        echo(f"note: cache {path} is of training data as far as its manifest says (split=train, "
             f"part={data.get('part')}); fidelity on training data flatters a student. A separate test file: "
             "cache it with --heldout")
    return cache


def example_hashes(cache: Any) -> set[bytes]:
    """sha256 of each cached example's token ids (ids like train-0 repeat across files; the tokens do not)."""
    import hashlib

    hashes = set()
    for shard in cache.shards:
        for ids in cache.store.parquet(shard["file"]).read(columns=["input_ids"])["input_ids"].to_pylist():
            hashes.add(hashlib.sha256(np.asarray(ids, np.int64).tobytes()).digest())
    return hashes


def _exists(location: str) -> bool:
    from kdpipe.cache.format import read_manifest

    try:
        return bool(read_manifest(location))
    except (KdpipeError, OSError):
        return False


def fidelity(model: Any, tokenizer: Any, cache: Any, cfg: EvaluateConfig, spec: ModelSpec) -> dict[str, float]:
    """KL(teacher‖student) over k+1 atoms, top-1 agreement, top-k recall, ECE on the cache (see kdpipe.metrics)."""
    if vocab_hash(tokenizer) != cache.manifest["tokenizer"]["vocab_hash"]:
        spec.notes.append(f"no fidelity: its tokenizer differs from the cache's teacher ({cache.manifest['tokenizer']['name']})")
        return {}
    if cache.manifest["sparse"]["mode"] != "topk":
        spec.notes.append(f"no fidelity: cache {cache.path} is {cache.manifest['sparse']['mode']}; fidelity needs a top-k cache")
        return {}
    rows = []
    for example in cache.iter_examples():
        rows.append(example)
        if cfg.cache_limit and len(rows) >= cfg.cache_limit:
            break
    ids = torch.as_tensor(np.concatenate([r.targets.topk_ids for r in rows]).astype(np.int64))
    logprobs = torch.as_tensor(np.concatenate([r.targets.topk_logprobs for r in rows]).astype(np.float32))
    tail = torch.as_tensor(np.concatenate([r.targets.tail_mass for r in rows]).astype(np.float32))
    labels = torch.as_tensor(np.concatenate([r.labels for r in rows]).astype(np.int64))

    def fn(logp: torch.Tensor, flat: slice) -> dict[str, torch.Tensor]:
        dev = logp.device
        return metrics.fidelity_stats(logp, ids[flat].to(dev), logprobs[flat].to(dev), tail[flat].to(dev), labels[flat].to(dev))

    stats = scoring.map_positions(model, [r.input_ids for r in rows], [r.positions for r in rows], fn,
                                  tokenizer.pad_token_id, cfg.batch_size, cfg.max_batch_tokens, desc=f"{spec.name}: fidelity")
    return metrics.summarize_fidelity(stats)


# ---------------------------------------------------------------- lm-evaluation-harness


def _check_lm_eval(tasks: list[str] | None = None) -> Any:
    """lm-eval's TaskManager, after checking that lm-eval is installed and knows every task in `tasks`."""
    if importlib.util.find_spec("lm_eval") is None:
        raise KdpipeError("--lm-eval needs lm-evaluation-harness, which is not installed: "
                          "pip install 'kdpipe[lm-eval]' (or pip install lm-eval)")
    if tasks is None:
        return None
    import difflib

    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`lm-eval ls tasks` lists them)"
            raise KdpipeError(f"lm-eval has no task '{task}'{hint}")
    return manager


def run_lm_eval(model: Any, tokenizer: Any, cfg: EvaluateConfig, manager: Any = None) -> dict[str, float]:
    """lm-eval's own `simple_evaluate` on an `HFLM` wrapping the loaded model; every numeric metric, no stderr."""
    _check_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.lm_eval), limit=cfg.limit, random_seed=cfg.seed,
                                      numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                      fewshot_random_seed=cfg.seed, log_samples=False, task_manager=manager)
    except KdpipeError:
        raise
    except Exception as e:
        raise KdpipeError(lm_eval_error(e, cfg.lm_eval)) from None
    if not out or "results" not in out:
        raise KdpipeError(f"lm-eval returned no results for {', '.join(cfg.lm_eval)}")
    values: dict[str, float] = {}
    for task, result in out["results"].items():
        for key, value in result.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric if filt in ("", "none") else f"{metric}[{filt}]"
            values[f"lm-eval/{task}/{name}"] = float(value)
    return values


NETWORK_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                  "HfHubHTTPError", "ConnectTimeout", "ReadTimeout", "MaxRetryError")


def lm_eval_error(e: BaseException, tasks: list[str]) -> str:
    """A one-paragraph message for an exception out of lm-eval: data unreachable, a missing package, or other."""
    import os

    text, kind = _first_line(e), type(e).__name__
    names = ", ".join(tasks)
    if isinstance(e, ModuleNotFoundError):
        return (f"lm-eval task(s) {names} need the Python package '{e.name}', which is not installed "
                f"(pip install {e.name}, or lm-eval's extra for the task, e.g. pip install 'lm-eval[ifeval]')")
    chain = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    lowered = text.lower()
    if chain & set(NETWORK_ERRORS) or any(w in lowered for w in ("couldn't reach", "offline", "connection", "internet")):
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if offline else ""
        return (f"lm-eval could not get the data of {names}{hint}: {kind}: {text}. lm-eval downloads its datasets "
                "from the Hugging Face hub: run once with network access (they are cached), or point HF_HOME at a "
                "cache that holds them")
    return f"lm-eval failed on {names}: {kind}: {text}"


# ---------------------------------------------------------------- output


def metric_keys(results: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for m in results["models"]:
        keys += [k for k in m["metrics"] if k not in keys]
    return keys


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def format_table(results: dict[str, Any]) -> str:
    """One table: a row per metric, a column per model."""
    names = [m["name"] for m in results["models"]]
    rows = [[k] + [_fmt(m["metrics"].get(k)) for m in results["models"]] for k in metric_keys(results)]
    header = ["metric"] + names
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def write_results(results: dict[str, Any], predictions: list[dict[str, Any]], out: Path,
                  extra: list[str] = ()) -> list[str]:
    """results.json, results.csv (a row per metric, a column per model) and predictions.jsonl into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.csv"]
    with open(files[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric"] + [m["name"] for m in results["models"]])
        for key in metric_keys(results):
            writer.writerow([key] + ["" if m["metrics"].get(key) is None else m["metrics"][key] for m in results["models"]])
    if predictions:
        files.append(out / "predictions.jsonl")
        with open(files[-1], "w") as f:
            for p in predictions:
                f.write(json.dumps(p, default=str) + "\n")
    results["files"] = [str(p) for p in files] + list(extra)
    write_atomic(files[0], (json.dumps(results, indent=2, default=_json_default) + "\n").encode())  # last: marks the run done
    return results["files"]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _output_folder(cfg: EvaluateConfig, specs: list[ModelSpec], record: dict[str, Any] | None) -> Path:
    if cfg.output:
        return Path(cfg.output)
    runs = [s.run for s in specs if s.run is not None]
    return runs[0] / "eval" if runs else Path("eval")


# ---------------------------------------------------------------- small helpers


def _read_json(path: Path, quiet: bool = False) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        if quiet:
            return {}
        raise KdpipeError(f"{path} could not be read as JSON: {_first_line(e)}") from None


def _short(name: str) -> str:
    path = Path(name)
    return path.name if path.exists() or name.startswith(("/", ".", "~")) else name


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def summary(results: dict[str, Any]) -> str:
    files = results.get("files", [])
    return f"wrote {', '.join(files)}" if files else ""
