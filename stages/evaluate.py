"""Evaluate: task metrics, fidelity to the teacher, lm-evaluation-harness tasks; several models side by side.

Recipe: resolve the models (hub ids, folders, LoRA adapters, run folders; by default the latest
finished run's student, its base and its teacher), load and check the data once, then one model at a
time (never two in memory): load, run each task, the cache fidelity pass and lm-eval, free. Write
one table as JSON and CSV (+ per-example predictions and plots) and return it. The parts are
`kdpipe.evaluation`; this module imports no torch until `run`, since the CLI reads `EvaluateConfig`.
Its config, recipe and registration (`STAGE`) are all here.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import kdpipe
from kdpipe.config import option
from kdpipe.data.sources import DataConfig, load_examples
from kdpipe.data.templates import get_template
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.report import definitions as metric_definitions
from kdpipe.evaluation.report import format_table, summary, write_results
from kdpipe.run_folder import read_json, run_lock
from kdpipe.stages.base import VERIFY_HELP, Stage

__all__ = ["STAGE", "EvaluateConfig", "format_table", "run", "summary"]


@dataclass
class EvaluateConfig(DataConfig):
    """Options of `kdpipe evaluate` (YAML keys; CLI options with dashes)."""

    model: list[str] = option([], "Model to evaluate (repeat for several): hub id, folder, LoRA adapter "
                                  "folder or run "
                                  "folder. Default: the latest finished run's student, its base and its "
                                  "teacher.")
    task: list[str] = option(["auto"], "classify, exact-match, perplexity (comma-separated), or auto (by "
                                       "template: "
                                       "sentiment -> classify, arithmetic -> exact-match,perplexity, else "
                                       "perplexity).")
    cache: str | None = option(None, "Held-out teacher cache: fidelity to the teacher (KL, top-1 agreement, "
                                     "top-k recall, ECE).")
    cache_limit: int | None = option(None, "Use at most this many cached examples.")
    checker: str | None = option(None, "Exact-match checker: arithmetic, exact, regex:PATTERN ({field} "
                                       "inserts a field, "
                                       "escaped) or path/to/file.py:function (fields, answer) -> bool. "
                                       "Default: arithmetic "
                                       "for the arithmetic template, else exact (equal to the reference, "
                                       "stripped).")
    generate: bool = option(False, "classify by greedy generation and parsing the label after 'Sentiment:' "
                                   "(the default "
                                   "for sentiment-think) instead of scoring each label.")
    max_new_tokens: int | None = option(None, "Generation length (default: longest reference + 16; 256 for "
                                              "sentiment-think).")
    lm_eval: list[str] = option([], "lm-evaluation-harness tasks, e.g. ifeval,hellaswag (needs "
                                    "kdpipe[lm-eval]; --limit applies; --max-new-tokens caps generation).")
    lm_eval_data: list[str] = option([], "TASK=FILE: run that --lm-eval task on a local JSONL/JSON/CSV/"
                                         "Parquet file in the task's own format instead of its hub data set "
                                         "(e.g. ifeval=ifeval.jsonl with key, prompt, instruction_id_list, "
                                         "kwargs).")
    output: str | None = option(None, "Folder for results.json/.csv, predictions and plots (default: "
                                      "RUN/eval for a run, else eval).")
    batch_size: int = option(64, "Most sequences in one forward pass (or one generation batch).")
    max_batch_tokens: int = option(16384, "Most tokens (rows × longest row) in one forward pass.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Weights dtype (auto keeps the "
                                                                    "checkpoint's).")
    device: str = option("auto", "Device: auto (CUDA if present), cpu, cuda, cuda:1 ...")
    verify: Literal["fast", "full"] = option("fast", VERIFY_HELP)
    plot: bool | None = option(None, "Write metrics.png (and training curves of runs); needs matplotlib. "
                                     "Default: when matplotlib is installed.")

    def __post_init__(self) -> None:
        super().__post_init__()
        from kdpipe.evaluation.tasks import TASK_NAMES  # the task registry (numpy, no torch)

        unknown = [t for t in self.task if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown task {', '.join(map(repr, unknown))}; "
                             f"use one of {', '.join(TASK_NAMES)}")
        for name in ("batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_new_tokens", "cache_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for pair in self.lm_eval_data:
            task, _, path = pair.partition("=")
            if not task or not path:
                raise ValueError(f"lm_eval_data takes TASK=FILE (e.g. ifeval=ifeval.jsonl), not {pair!r}")
            if task not in self.lm_eval:
                raise ValueError(f"lm_eval_data names the task {task!r}, which is not among the lm_eval "
                                 f"tasks ({', '.join(self.lm_eval) or 'none'}): add --lm-eval {task}")

    @property
    def lm_eval_files(self) -> dict[str, str]:
        """--lm-eval-data as {task: file}."""
        return dict(pair.partition("=")[::2] for pair in self.lm_eval_data)


def run(cfg: EvaluateConfig, command: str = "", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every model of `cfg`; write results.json/.csv (+ predictions, plots); return the results."""
    import torch

    from kdpipe.cache.storage import Store
    from kdpipe.evaluation import specs
    from kdpipe.models import pick_device

    torch.manual_seed(cfg.seed)
    pick_device(cfg.device)  # a device this machine lacks: said before anything loads
    models = specs.resolve_models(cfg, echo)  # with no --dataset, cfg gets the run's data
    out = specs.output_folder(cfg.output, models)
    Store.open(str(out)).check_writable("--output")  # a read-only folder or a file: said before any work
    with run_lock(out):  # a second evaluation into the same folder fails at once, as a second training run
        return _evaluate(cfg, command, echo, models, out)


def _evaluate(cfg: EvaluateConfig, command: str, echo: Callable[[str], None], models: list[Any],
              out: Any) -> dict[str, Any]:
    from kdpipe.evaluation import fidelity, harness, specs
    from kdpipe.evaluation.tasks import check_examples, data_info, resolve_tasks

    template = get_template(cfg.resolved_template(), cfg.label_names) if cfg.dataset else None
    tasks = resolve_tasks(cfg, template)
    if not tasks and not cfg.cache and not cfg.lm_eval:
        raise KdpipeError("nothing to evaluate: pass --dataset (with --task), --cache and/or --lm-eval")
    manager = harness.check_lm_eval(cfg.lm_eval, cfg.lm_eval_files) if cfg.lm_eval else None
    examples = load_examples(cfg).examples if tasks else []
    if tasks:
        check_examples(examples, template, tasks, cfg)
    cache = fidelity.open_heldout(cfg.cache, echo, models, cfg.verify) if cfg.cache else None
    work = Work(tasks, examples, template, cache, manager)
    tokenizers = specs.load_tokenizers(models, echo)

    results: dict[str, Any] = {
        "kdpipe_version": kdpipe.__version__, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": data_info(cfg, examples, template, tasks, cache.manifest if cache else None),
        "cache": cfg.cache, **({"cache_heldout": cache.manifest.heldout} if cache else {}),
        "lm_eval": cfg.lm_eval, "lm_eval_data": cfg.lm_eval_files, "definitions": {}, "models": [],
    }
    predictions: list[dict[str, Any]] = []
    for spec in models:  # one at a time: never two models in memory
        evaluated = evaluate_model(spec, tokenizers[spec.name], cfg, work, echo)
        if evaluated is not None:
            results["models"].append(evaluated[0])
            predictions += evaluated[1]

    results["definitions"] = metric_definitions(results)
    plotted = _plots(results, models, out, echo, cfg.plot) if cfg.plot is not False else []
    write_results(results, predictions, out, plotted)
    return results


@dataclass(frozen=True)
class Work:
    """What every model is evaluated on: the tasks and their data, the held-out cache, lm-eval's tasks."""

    tasks: list[str]
    examples: list[Any]
    template: Any
    cache: Any
    lm_eval_manager: Any


def evaluate_model(spec: Any, tokenizer: Any, cfg: EvaluateConfig, work: Work,
                   echo: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Load one model, run the tasks, fidelity and lm-eval on it, free it: (its results.json entry, its
    predictions), or None for an optional model that does not load."""
    import torch

    from kdpipe.evaluation import fidelity, harness, specs
    from kdpipe.evaluation.tasks import TASKS
    from kdpipe.models import source_record

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    try:
        model = specs.load_model(spec, cfg.dtype, cfg.device)
    except KdpipeError as e:
        if not spec.optional:
            raise
        echo(f"skipping the {spec.role or 'model'} {spec.source}: {e.message}")
        return None
    threads = torch.get_num_threads()
    if specs.small_on_cpu(model):
        torch.set_num_threads(1)
    values: dict[str, float] = {}
    predictions: list[dict[str, Any]] = []
    for task in work.tasks:
        out, preds = TASKS[task].run(model, tokenizer, work.examples, work.template, cfg, spec)
        values.update({f"{task}/{k}": v for k, v in out.items()})
        predictions += [{"model": spec.name, "task": task, **p} for p in preds]
    if work.cache is not None:
        fid = fidelity.fidelity(model, tokenizer, work.cache, cfg, spec)
        values.update({f"fidelity/{k}": v for k, v in fid.items()})
    if cfg.lm_eval:
        scores, samples = harness.run_lm_eval(model, tokenizer, cfg, work.lm_eval_manager)
        values.update(scores)
        predictions += [{"model": spec.name, **p} for p in samples]
    torch.set_num_threads(threads)
    del model
    gc.collect()
    for note in spec.notes:
        echo(f"note ({spec.name}): {note}")
    row = {"name": spec.name, "source": spec.source, "kind": spec.kind, "role": spec.role, "path": spec.path,
           "base": spec.base, "run": str(spec.run) if spec.run else None, "notes": spec.notes,
           **(source_record(spec.path) if spec.kind == "model" else {}),
           "metrics": values, "seconds": round(time.perf_counter() - start, 2)}
    return row, predictions


def _plots(results: dict[str, Any], models: list[Any], out: Any, echo: Callable[[str], None],
           asked: bool | None) -> list[str]:
    """The plots' files; a plot that fails is said and costs nothing else (the results are still written).
    A missing matplotlib is said only when plots were asked for (--plot), not on every default run."""
    from kdpipe.evaluation import plots

    try:
        plotted, message = plots.write_plots(results, {s.name: s.run for s in models if s.run}, out)
    except Exception as e:  # noqa: BLE001 - matplotlib or a disk: the evaluation itself is done
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        echo(f"warning: the plots could not be written ({type(e).__name__}: {reason}); the results are "
             "written without them")
        return []
    if message and asked:
        echo(message)
    return plotted


# ---------------------------------------------------------------- the stage: a command, a `kdpipe run` step


def state(cfg: EvaluateConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    """Skip when results.json is from the same command and no earlier step ran (nothing it scores
    changed)."""
    results = read_json(Path(cfg.output) / "results.json")
    if results is not None and results.get("command") == command and not anything_ran:
        return "skip", f"{cfg.output}/results.json is from the same command"
    return "run", ""


STAGE = Stage(
    name="evaluate", config=EvaluateConfig, runner=lambda cfg, command, echo, state: run(cfg, command, echo),
    state=state, summary=lambda results, cfg: summary(results),
    report=lambda results, cfg: format_table(results) + "\n" + summary(results),
    repeatable=("model",), tabulates=True,
    previous=lambda cfg: read_json(Path(cfg.output) / "results.json"),
    help="""Evaluate models side by side: task metrics, fidelity to the teacher, lm-eval benchmarks.

    \b
    Examples:
      kdpipe evaluate                                   # latest finished run: student, base, teacher
      kdpipe evaluate --model runs/demo-student --model runs/demo/teacher \\
          --dataset kdpipe:arithmetic --split test
      kdpipe evaluate --model runs/imdb-0.6b --dataset imdb --split test --limit 500 \\
          --cache cache/imdb-heldout
    Writes results.json, results.csv, predictions.jsonl and metrics.png to --output
    (default RUN/eval or eval).
    """)
